"""Training a found recurrent cell (RNN.md 2.5): the SGD -> ASGD switch, the averaged weights, exact resume."""

import json
import subprocess
import sys

import pytest
import torch

from fastdarts.checkpoint import load_checkpoint
from fastdarts.errors import GenotypeError
from fastdarts.rnn import train as rnn_train
from fastdarts.rnn.data import load_corpus
from fastdarts.rnn.genotype import DARTS_V1
from fastdarts.rnn.model import RecurrentEvalModel

from .test_rnn import small_corpus
from .test_runs import assert_same_end


def test_switch_to_asgd_follows_darts_rule_and_scores_the_averaged_weights():
    torch.manual_seed(0)
    model = RecurrentEvalModel(20, DARTS_V1, 4, 4)
    config = rnn_train.RecurrentTrainConfig(nonmono=2, emsize=4, nhid=4).resolved()
    optimizer = rnn_train.AveragingOptimizer(model, config)
    # Worse than the best of all but the last 2 epochs: 4.5 is not (the best before [4, 3] is 5), 4.2 is (4).
    for loss in (5.0, 4.0, 3.0, 4.5):
        optimizer.end_epoch(lambda loss=loss: loss)
        assert not optimizer.averaging
    optimizer.end_epoch(lambda: 4.2)
    assert optimizer.averaging
    assert isinstance(optimizer.current, torch.optim.ASGD) and optimizer.best_loss == 3.0

    x = torch.randint(0, 20, (6, 2))
    for _ in range(3):  # some ASGD steps
        optimizer.current.zero_grad()
        logits = model(x, model.init_hidden(2)).logits
        logits.logsumexp(-1).mean().backward()
        optimizer.current.step()
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    seen = {}
    optimizer.end_epoch(lambda: seen.update(rnn_train.snapshot(model)) or 1.0)  # a new best, with the averaged weights
    ax = optimizer.current.state[model.cell.W0]["ax"]
    assert torch.equal(seen["cell.W0"], ax) and not torch.equal(ax, raw["cell.W0"])
    assert torch.equal(optimizer.best["cell.W0"], ax)
    assert all(torch.equal(v, raw[k]) for k, v in model.state_dict().items())  # the raw weights train on

    again = rnn_train.AveragingOptimizer(model, config)
    again.load_state_dict(optimizer.state_dict())
    assert again.averaging and torch.equal(again.current.state[model.cell.W0]["ax"], ax)


@pytest.mark.slow
def test_train_run_resumes_bit_exact_and_reports_test_perplexity(tmp_path):
    data = small_corpus(tmp_path / "data", lines=(80, 30, 30))
    settings = dict(data=str(data), emsize=8, nhid=8, batch_size=8, epochs=3, nonmono=1, progress=False)
    whole = rnn_train.run(**settings, out=str(tmp_path / "whole"))
    first = rnn_train.run(**settings, stop_after=2, out=str(tmp_path / "split"))
    assert first.stopped_early
    resumed = rnn_train.run(resume=tmp_path / "split", progress=False)
    assert_same_end(whole.run_dir, resumed.run_dir)
    a, b = (load_checkpoint(d / "checkpoint.pt")["averaging_optimizer"] for d in (whole.run_dir, resumed.run_dir))
    assert a["history"] == b["history"] and a["averaging"] == b["averaging"] and a["best_loss"] == b["best_loss"]
    assert all(torch.equal(a["best"][k], b["best"][k]) for k in a["best"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sb[k])) for k in sa)
    result = json.loads((tmp_path / "whole" / "result.json").read_text())
    words = len(load_corpus(data).dictionary)
    assert result["test_ppl"] == resumed.test_ppl and 1 < result["test_ppl"] < words  # below the uniform model
    assert result["parameters"] == whole.parameters == RecurrentEvalModel(words, whole.genotype, 8, 8).parameter_count()


def test_bad_genotype_is_one_line_and_status_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fastdarts.train", "--space", "rnn", "--genotype",
                           "Genotype(recurrent=[('conv', 0)], concat=[1])", "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "unknown op 'conv'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    with pytest.raises(GenotypeError, match="not a built-in recurrent genotype"):
        rnn_train.RecurrentTrainConfig(genotype="DARTS_V3").resolved()
