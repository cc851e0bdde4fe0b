"""DARTS- (METHODS_MORE.md section 5): DARTS with an auxiliary skip connection on every edge, of decaying weight.

Every edge computes `sum_k softmax(alpha)_k o_k(x) + beta_e * aux(x)`, aux an identity on stride-1 edges and
a FactorizedReduce of its own (trainable, not the skip candidate's) on stride-2 edges. beta_e is a constant of
the epoch, the same for every edge of both cell types, in the weight step and the architecture step alike; it
takes no gradient, so the architecture gradient is DARTS's through the softmax. The genotype is DARTS's rule on
softmax(alpha), the auxiliary skip dropped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from .base import NetworkStyle, check_epoch, check_state_keys
from .betadarts import check_number
from .darts import DARTSMethod

# beta_e / beta_0 at epoch e of E (the published DecayScheduler with T_max = E; "none": constant).
DECAYS = {
    "linear": lambda e, E: (E - e) / E,
    "cosine": lambda e, E: (1 + math.cos(math.pi * e / E)) / 2,
    "slow_cosine": lambda e, E: math.cos(math.pi * e / (2 * E)),
    "none": lambda e, E: 1.0,
}


class DARTSMinusMethod(DARTSMethod):
    """DARTS's softmax plus an auxiliary skip of weight `beta * decay(epoch)` on every edge."""

    name = "darts-minus"
    network_style = NetworkStyle(auxiliary_skip=True)

    def __init__(self, *, beta: float = 1.0, decay: str = "linear"):
        check_number("DARTSMinusMethod", "beta", beta)
        if decay not in DECAYS:
            raise ValueError(f"DARTSMinusMethod: decay must be one of {', '.join(DECAYS)}, got {decay!r}")
        self.beta, self.decay = beta, decay
        self.auxiliary_weight = float(beta)

    def auxiliary_skip(self) -> float:
        return self.auxiliary_weight

    def set_epoch(self, epoch: int, epochs: int) -> None:
        check_epoch(epoch, epochs)
        self.auxiliary_weight = self.beta * DECAYS[self.decay](epoch, epochs)

    def epoch_settings(self) -> dict[str, float]:
        return {"auxiliary_skip": self.auxiliary_weight}

    def state_dict(self) -> dict:
        return {"auxiliary_weight": self.auxiliary_weight}

    def load_state_dict(self, state: Mapping) -> None:
        check_state_keys(self, state, {"auxiliary_weight"})
        check_number("DARTSMinusMethod", "auxiliary_weight", state["auxiliary_weight"])
        self.auxiliary_weight = state["auxiliary_weight"]
