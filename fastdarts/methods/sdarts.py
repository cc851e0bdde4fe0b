"""SDARTS (METHODS_MORE.md section 6): DARTS whose weight step sees perturbed edge weights.

The architecture step is DARTS's (softmax(alpha)). Each weight step trains the weights on `clip(softmax(alpha) +
delta)` instead, used directly as the edge weights, where `clip` projects each edge's row back onto the simplex
(clamp to [0, 1], the argmax set to 1 if the row became all zeros, divided by the row's sum), and delta is
- RS (random smoothing): uniform in [-eps, eps], elementwise, for both cell types;
- ADV: a 7-step L-infinity PGD attack on the weight step's batch that raises its loss: a random start as RS,
  then steps of `2 eps / steps * sign(gradient)`, each projected into the eps-box around softmax(alpha) and
  clipped; the network in evaluation mode meanwhile (its BNs normalise with their running statistics); no
  perturbation when the attack ends below the loss it started from.
eps grows linearly with the epoch: `eps_e = start + (end - start) * e / epochs` (0.03 to 0.3 in the published
code). The random draws come from this object's own generator (seeded with `seed`, kept in the checkpoint).
Over several processes each process attacks its own part of the batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor

from ..bilevel import frozen
from .base import CellWeights, check_epoch, check_state_keys
from .betadarts import check_number
from .darts import DARTSMethod

VARIANTS = ("rs", "adv")


def project(weights: Tensor) -> Tensor:
    """Each row clamped to [0, 1] and divided by its sum; a row clamped to all zeros becomes the one-hot of its
    argmax before the clamp."""
    top = weights.argmax(dim=-1, keepdim=True)
    clamped = weights.clamp(0.0, 1.0)
    empty = clamped.sum(dim=-1, keepdim=True) == 0
    clamped = torch.where(empty, torch.zeros_like(clamped).scatter(-1, top, 1.0), clamped)
    return clamped / clamped.sum(dim=-1, keepdim=True)


def uniform_noise(weights: Mapping[str, Tensor], eps: float, generator: torch.Generator) -> dict[str, Tensor]:
    """`clip(w + U(-eps, eps))` for each cell type, drawn in the mapping's order (on the CPU, as the generator:
    the same draws wherever the network computes)."""
    noise = {
        cell: torch.empty(w.shape, dtype=w.dtype).uniform_(-eps, eps, generator=generator)
        for cell, w in weights.items()
    }
    return {cell: project(w + noise[cell].to(w.device)) for cell, w in weights.items()}


class SDARTSMethod(DARTSMethod):
    """DARTS with the weight step on randomly (RS) or adversarially (ADV) perturbed edge weights."""

    name = "sdarts"

    def __init__(self, *, variant: str = "rs", epsilon_start: float = 0.03, epsilon_end: float = 0.3,
                 pgd_steps: int = 7, seed: int = 0):  # fmt: skip
        if variant not in VARIANTS:
            raise ValueError(f"SDARTSMethod: variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        check_number("SDARTSMethod", "epsilon_start", epsilon_start)
        check_number("SDARTSMethod", "epsilon_end", epsilon_end)
        if isinstance(pgd_steps, bool) or not isinstance(pgd_steps, int) or pgd_steps < 1:
            raise ValueError(f"SDARTSMethod: pgd_steps must be an integer >= 1, got {pgd_steps!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"SDARTSMethod: seed must be an integer, got {seed!r}")
        self.variant, self.pgd_steps = variant, pgd_steps
        self.epsilon_start, self.epsilon_end = epsilon_start, epsilon_end
        self.epsilon = epsilon_start
        self.generator = torch.Generator().manual_seed(seed)
        self._perturbed: dict[str, Tensor] | None = None  # the edge weights of the weight step under way

    def forward_weights(self, arch: Mapping[str, Tensor]) -> dict[str, CellWeights]:
        if self._perturbed is not None:
            return {cell: CellWeights(self._perturbed[cell]) for cell in arch}
        return super().forward_weights(arch)

    @contextlib.contextmanager
    def weight_step(self, model, batch, loss_fn) -> Iterator[None]:
        with torch.no_grad():
            clean = {cell: alpha.softmax(dim=-1) for cell, alpha in model.arch_parameters_by_cell().items()}
        perturbed = uniform_noise(clean, self.epsilon, self.generator)
        if self.variant == "adv":
            perturbed = self.attack(model, batch, loss_fn, clean, perturbed)
        self._perturbed = perturbed
        try:
            yield
        finally:
            self._perturbed = None

    def attack(self, model, batch, loss_fn, clean: dict[str, Tensor], start: dict[str, Tensor]) -> dict[str, Tensor]:
        """PGD from `start` within the eps-box around `clean`, the network in evaluation mode; `clean` when the
        attack does not raise the loss."""
        x, y = batch
        training = model.training
        model.eval()
        try:
            # The network's weights take no gradient in the attack's forward passes: frozen once for all of them
            # (weight_parameters() walks the supernet's modules, milliseconds a call).
            with frozen(model.weight_parameters()):
                with torch.no_grad():
                    before = self.loss_at(model, clean, x, y, loss_fn)
                eps = self.epsilon
                step = 2 * eps / self.pgd_steps
                weights = start
                for _ in range(self.pgd_steps):
                    weights = {cell: w.detach().requires_grad_() for cell, w in weights.items()}
                    grads = torch.autograd.grad(self.loss_at(model, weights, x, y, loss_fn), list(weights.values()))
                    with torch.no_grad():
                        stepped = {cell: w + step * g.sign() for (cell, w), g in zip(weights.items(), grads)}
                        box = {cell: (w - clean[cell]).clamp(-eps, eps) for cell, w in stepped.items()}
                        weights = {cell: project(clean[cell] + delta) for cell, delta in box.items()}
                with torch.no_grad():
                    after = self.loss_at(model, weights, x, y, loss_fn)
        finally:
            model.train(training)
        return clean if before > after else weights

    def loss_at(self, model, weights: dict[str, Tensor], x: Tensor, y: Tensor, loss_fn) -> Tensor:
        """The loss of the batch with `weights` as the edge weights."""
        self._perturbed = weights
        try:
            return loss_fn(model(x), y)
        finally:
            self._perturbed = None

    def set_epoch(self, epoch: int, epochs: int) -> None:
        check_epoch(epoch, epochs)
        self.epsilon = self.epsilon_start + (self.epsilon_end - self.epsilon_start) * epoch / epochs

    def epoch_settings(self) -> dict[str, float]:
        return {"epsilon": self.epsilon}

    def state_dict(self) -> dict:
        return {"epsilon": self.epsilon, "generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping) -> None:
        check_state_keys(self, state, {"epsilon", "generator"})
        check_number("SDARTSMethod", "epsilon", state["epsilon"])
        generator_state = state["generator"]
        if not (isinstance(generator_state, Tensor) and generator_state.dtype == torch.uint8):
            raise ValueError("SDARTSMethod: the generator state must be a uint8 tensor from Generator.get_state()")
        try:
            self.generator.set_state(generator_state)
        except RuntimeError as e:
            raise ValueError(f"SDARTSMethod: the generator state does not fit a CPU generator ({e})") from None
        self.epsilon = state["epsilon"]
