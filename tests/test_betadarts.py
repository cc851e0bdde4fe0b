"""beta-DARTS against a direct transcription of METHODS_MORE.md section 7."""

import pytest
import torch

from fastdarts.methods import BetaDARTSMethod, make_method

from .method_checks import architect_grads, cross_entropy_grads, darts_rule, tiny_batch, tiny_network


def test_weights_regulariser_gradient_and_genotype_follow_the_formulas():
    method = BetaDARTSMethod()
    net = tiny_network(method)
    with torch.no_grad():
        for alpha in net.arch_parameters():
            alpha.normal_()
    method.set_epoch(30, 100)  # the published 100-epoch run: lambda = 50 * 30 / 100
    assert method.strength == 15.0 and method.epoch_settings() == {"beta_decay_lambda": 15.0}
    arch = net.arch_parameters_by_cell()
    weights = method.forward_weights(arch)
    for cell, alpha in arch.items():
        torch.testing.assert_close(weights[cell].weights, torch.exp(alpha) / torch.exp(alpha).sum(1, keepdim=True))
        assert weights[cell].mask is None
    rows = torch.cat([net.alpha_normal, net.alpha_reduce])
    expected = 15.0 * torch.stack([torch.log(torch.exp(row).sum()) for row in rows]).sum() / rows.shape[0]
    torch.testing.assert_close(method.regulariser(), expected)

    batch = tiny_batch()
    grads, objective = architect_grads(net, batch)
    ce_grads, ce = cross_entropy_grads(net, batch)
    torch.testing.assert_close(objective, ce + expected.detach())
    for cell, alpha in arch.items():
        # d/d alpha_e of lambda * mean_e logsumexp(alpha_e) = lambda / |E| * softmax(alpha_e)
        decay = 15.0 / rows.shape[0] * alpha.detach().softmax(-1)
        torch.testing.assert_close(grads[cell], ce_grads[cell] + decay)
        assert method.derive_cell(alpha, 4) == darts_rule(alpha.softmax(-1), 4, method.primitives)


def test_lambda_schedule_state_and_bad_settings():
    method = make_method("beta-darts", lambda_start=1.0, lambda_end=3.0)
    method.set_epoch(5, 10)
    assert method.strength == 2.0
    other = BetaDARTSMethod()
    other.load_state_dict(method.state_dict())
    assert other.strength == 2.0
    with pytest.raises(ValueError, match="strength"):
        other.load_state_dict({"strength": float("nan")})
    with pytest.raises(ValueError, match="BetaDARTSMethod: lambda_end must be a finite number >= 0, got -1"):
        BetaDARTSMethod(lambda_end=-1)
    with pytest.raises(RuntimeError, match="forward pass first"):
        BetaDARTSMethod().regulariser()
