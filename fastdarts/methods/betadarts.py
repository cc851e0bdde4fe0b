"""beta-DARTS (METHODS_MORE.md section 7): DARTS with the beta-decay regulariser on the architecture loss.

The regulariser is `lambda_e * mean over the edges of both cell types of logsumexp_k alpha[e, k]` (raw
alphas), whose gradient on edge e is `lambda_e / |E| * softmax(alpha_e)`: a decay of each op's parameter in
proportion to its weight. lambda grows linearly with the epoch: `lambda_e = start + (end - start) * e / epochs`,
the published code's `50 * e / 100` with end 50 over its 100 epochs. (The published second-order step leaves
the term out; with `--unrolled` fastdarts keeps it in the architecture objective, as in the first-order step.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from .base import check_epoch, check_state_keys
from .darts import DARTSMethod


def beta_decay(alphas: Sequence[Tensor]) -> Tensor:
    """The mean over every edge of every cell type of `logsumexp_k alpha[e, k]`."""
    return torch.cat([alpha.logsumexp(dim=-1) for alpha in alphas]).mean()


def check_number(method: str, name: str, value: object, *, positive: bool = False) -> None:
    """A finite number >= 0 (> 0 with `positive`), or a ValueError naming `method` and `name`."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not (ok and (value > 0 if positive else value >= 0)):
        raise ValueError(f"{method}: {name} must be a finite number {'>' if positive else '>='} 0, got {value!r}")


class BetaDARTSMethod(DARTSMethod):
    """DARTS's softmax, genotype rule and search step, plus the beta-decay term in the architecture loss."""

    name = "beta-darts"

    def __init__(self, *, lambda_start: float = 0.0, lambda_end: float = 50.0):
        check_number("BetaDARTSMethod", "lambda_start", lambda_start)
        check_number("BetaDARTSMethod", "lambda_end", lambda_end)
        self.lambda_start, self.lambda_end = lambda_start, lambda_end
        self.strength = lambda_start
        self._arch: tuple[Tensor, ...] = ()  # the parameters of the last forward pass

    def forward_weights(self, arch: Mapping[str, Tensor]):
        self._arch = tuple(arch.values())
        return super().forward_weights(arch)

    def regulariser(self) -> Tensor:
        if not self._arch:
            raise RuntimeError("BetaDARTSMethod.regulariser: run a forward pass first")
        return self.strength * beta_decay(self._arch)

    def set_epoch(self, epoch: int, epochs: int) -> None:
        check_epoch(epoch, epochs)
        self.strength = self.lambda_start + (self.lambda_end - self.lambda_start) * epoch / epochs

    def epoch_settings(self) -> dict[str, float]:
        return {"beta_decay_lambda": self.strength}

    def diagnostics(self, arch: Mapping[str, Tensor]) -> dict[str, float]:
        """The entropies, and `beta_decay`: the mean logsumexp of the alphas the regulariser scales."""
        return {**super().diagnostics(arch), "beta_decay": float(beta_decay([a.detach() for a in arch.values()]))}

    def state_dict(self) -> dict:
        return {"strength": self.strength}

    def load_state_dict(self, state: Mapping) -> None:
        check_state_keys(self, state, {"strength"})
        check_number("BetaDARTSMethod", "strength", state["strength"])
        self.strength = state["strength"]
