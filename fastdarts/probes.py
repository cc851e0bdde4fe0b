"""Measurements of a network's optimisation landscape (CONVERGENCE_STUDY.md section 8.4): gradient variance and
noise-to-signal ratio, the top Hessian eigenvalue, filter-normalised loss curves and grids, and the empirical NTK
Gram matrix.

The algorithms take a loss as a function of the parameters (`LossFn`), so they work on any model and are tested on
ones with known answers; `ModelProbe` supplies those functions for an evaluation network on a data set. Everything
runs in eval mode (running BN statistics, no drop path, no augmentation), without weight decay, on a parameter
dictionary passed through `torch.func.functional_call`: the model itself is never changed.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.func import functional_call

from .data import BatchJob, Images

Params = dict[str, torch.Tensor]
# The mean loss of the samples at some indices, with the parameters given.
LossFn = Callable[[Params, torch.Tensor], torch.Tensor]


def flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def gradient(loss_fn: LossFn, params: Params, indices: torch.Tensor) -> torch.Tensor:
    """The flattened gradient of the mean loss on `indices` with respect to every tensor of `params`."""
    leaves = {name: p.detach().requires_grad_(True) for name, p in params.items()}
    loss = loss_fn(leaves, indices)
    return flat(torch.autograd.grad(loss, list(leaves.values()), materialize_grads=True))


def gradient_variance(loss_fn: LossFn, params: Params, indices: torch.Tensor, batch_size: int) -> dict:
    """The per-sample gradient variance E_i ||g_i - g||^2 (Shu et al.'s definition) estimated from minibatches.

    `indices` is cut into B = len // batch_size disjoint batches of b = `batch_size` (the remainder dropped),
    N = B b; with g_j the gradient of batch j and g their mean (the gradient of all N samples):
    GV_b = sum_j ||g_j - g||^2 / B, and GV_1 = GV_b b (N - 1) / (N - b), whose expectation over the partitions is
    the per-sample variance (1/N) sum_i ||g_i - g||^2 (exact when b = 1). NSR = GV_b / ||g||^2 is scale-free.
    """
    b = batch_size
    batches = len(indices) // b
    if batches < 2:
        raise ValueError(f"gradient variance needs at least 2 batches of {b}, got {len(indices)} samples")
    n = batches * b
    grads = torch.stack([gradient(loss_fn, params, indices[j * b : (j + 1) * b]).double() for j in range(batches)])
    mean = grads.mean(0)
    gv_b = float(((grads - mean) ** 2).sum(1).mean())
    mean_sq = float(mean.square().sum())
    return {
        "gv_1": gv_b * b * (n - 1) / (n - b),
        "gv_b": gv_b,
        "nsr": gv_b / mean_sq if mean_sq > 0 else float("inf"),
        "grad_norm": math.sqrt(mean_sq),
        "batch": b,
        "samples": n,
    }


def top_hessian_eigenvalue(grad_fn: Callable[[Params], torch.Tensor], params: Params, iterations: int = 20,
                           step: float = 1e-2, tolerance: float = 1e-3,
                           generator: torch.Generator | None = None) -> dict:  # fmt: skip
    """The Hessian eigenvalue of largest magnitude by power iteration on finite-difference Hessian-vector products.

    `grad_fn(params)` is the flattened gradient at `params`. With v of unit norm, Hv = (grad(w + step v) - grad(w))
    / step (the forward difference, as DARTS's architect takes, reusing grad(w)); the estimate is the Rayleigh
    quotient v'Hv, and the iteration stops when it changes by less than `tolerance`, relatively.
    """
    names = list(params)
    base = {name: p.detach() for name, p in params.items()}
    shapes = [base[name].shape for name in names]
    sizes = [base[name].numel() for name in names]

    def moved(v: torch.Tensor) -> Params:
        pieces = v.split(sizes)
        return {name: base[name] + step * piece.view(shape).to(base[name].dtype)
                for name, piece, shape in zip(names, pieces, shapes)}  # fmt: skip

    g0 = grad_fn(base).double()
    v = torch.randn(sum(sizes), generator=generator, dtype=torch.float64)
    v /= v.norm()
    estimate, history = float("nan"), []
    for _ in range(iterations):
        hv = (grad_fn(moved(v)).double() - g0) / step
        previous, estimate = estimate, float(v @ hv)
        history.append(estimate)
        norm = hv.norm()
        if norm == 0:
            break
        v = hv / norm
        if not math.isnan(previous) and abs(estimate - previous) <= tolerance * abs(estimate):
            break
    return {"lambda_max": estimate, "iterations": len(history), "history": history}


def filter_normalized_direction(params: Params, generator: torch.Generator | None = None) -> Params:
    """A random direction in parameter space as Li et al.'s loss-landscape code draws it (--xnorm filter
    --xignore biasbn): Gaussian, each filter (slice along dim 0) rescaled to the norm of the same filter of the
    weights, and zero for every tensor of one dimension or none (biases, BN scales and shifts)."""
    direction = {}
    for name, p in params.items():
        w = p.detach()
        if w.dim() <= 1:
            direction[name] = torch.zeros_like(w)
            continue
        d = torch.randn(w.shape, generator=generator, dtype=w.dtype)
        d_norms = d.flatten(1).norm(dim=1)
        w_norms = w.flatten(1).norm(dim=1)
        direction[name] = d * (w_norms / (d_norms + 1e-10)).view(-1, *[1] * (w.dim() - 1))
    return direction


def loss_surface(loss_fn: LossFn, params: Params, indices: torch.Tensor, directions: Sequence[Params],
                 coordinates: Sequence[Sequence[float]]) -> list[float]:  # fmt: skip
    """The loss on `indices` at w + sum_k t_k d_k for each tuple t of `coordinates` (one t_k per direction d_k)."""
    losses = []
    with torch.no_grad():
        for t in coordinates:
            moved = {name: p.detach() + sum(tk * d[name] for tk, d in zip(t, directions)) for name, p in params.items()}
            losses.append(float(loss_fn(moved, indices)))
    return losses


def sharpness_of_curves(ts: Sequence[float], curves: Sequence[Sequence[float]], radius: float = 0.25,
                        rise: float = 1.0) -> dict:  # fmt: skip
    """From 1-D loss curves L(t) along directions: `sharp` is the mean over directions of the largest rise
    L(t) - L(0) within |t| <= `radius`; `basin_halfwidth` the mean over directions and both sides of the smallest
    |t| where the loss rises by `rise` above L(0) (1 if it never does on the curve)."""
    ts = [float(t) for t in ts]
    centre = min(range(len(ts)), key=lambda i: abs(ts[i]))
    sharp, halfwidths = [], []
    for curve in curves:
        l0 = curve[centre]
        sharp.append(max(curve[i] - l0 for i, t in enumerate(ts) if abs(t) <= radius + 1e-9))
        for side in (1, -1):
            on_side = sorted((abs(t), curve[i]) for i, t in enumerate(ts) if t * side > 0)
            halfwidths.append(next((abs_t for abs_t, loss in on_side if loss >= l0 + rise), 1.0))
    return {"sharp": sum(sharp) / len(sharp), "basin_halfwidth": sum(halfwidths) / len(halfwidths)}


def gram_eigenvalues(per_sample_gradients: torch.Tensor) -> dict:
    """Eigenvalues of the Gram matrix K = G G' of per-sample gradients (rows of G), in float64."""
    g = per_sample_gradients.double()
    eigenvalues = torch.linalg.eigvalsh(g @ g.T)
    low, high = float(eigenvalues[0]), float(eigenvalues[-1])
    return {"ntk_lambda_min": low, "ntk_lambda_max": high, "ntk_condition": high / low if low > 0 else float("inf")}


# ----------------------------------------------------------------------------------------------
# The probes of an evaluation network on a data set


class ModelProbe:
    """The losses of `model` (an evaluation network; only its logits are used) on `data`, in eval mode, for the
    functions above. The batches are made once, without augmentation, and kept."""

    def __init__(self, model: torch.nn.Module, data: Images, eval_batch: int = 256):
        self.model, self.data, self.eval_batch = model, data, eval_batch
        self._cache: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    def params(self, weights_only: bool = False) -> Params:
        """The trainable parameters (all, or those of two or more dimensions), the auxiliary head excluded."""
        return {
            name: p.detach()
            for name, p in self.model.named_parameters()
            if p.requires_grad and not name.startswith("auxiliary_head.") and (p.dim() > 1 or not weights_only)
        }

    def _batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = tuple(indices.tolist())
        if key not in self._cache:
            self._cache[key] = self.data.make(BatchJob(indices))
        return self._cache[key]

    def logits(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        out = functional_call(self.model, params, (x,), strict=False)
        return out[0] if isinstance(out, tuple) else out

    def loss(self, params: Params, indices: torch.Tensor) -> torch.Tensor:
        """The mean cross-entropy on `indices`, in chunks of `eval_batch` (eval mode: chunks are independent)."""
        total = 0.0
        for chunk in indices.split(self.eval_batch):
            x, y = self._batch(chunk)
            total = total + F.cross_entropy(self.logits(params, x), y, reduction="sum")
        return total / len(indices)

    def per_sample_output_gradients(self, params: Params, indices: torch.Tensor) -> torch.Tensor:
        """Rows: the gradient of the sum of the logits of one sample (TE-NAS's empirical NTK), flattened."""
        rows = []
        for i in indices:
            leaves = {name: p.detach().requires_grad_(True) for name, p in params.items()}
            x, _ = self._batch(i.view(1))
            rows.append(flat(torch.autograd.grad(self.logits(leaves, x).sum(), list(leaves.values()),
                                                 materialize_grads=True)))  # fmt: skip
        return torch.stack(rows)


def recalibrated_copy(model: torch.nn.Module, data: Images, indices: torch.Tensor, batch_size: int) -> torch.nn.Module:
    """A copy of `model` whose BN running statistics are the cumulative averages over the batches of `indices` in
    train mode (TE-NAS's recal_bn), so that eval-mode probes at initialisation see real statistics."""
    copied = copy.deepcopy(model)
    bns = [m for m in copied.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average
    copied.train()
    drop_path = getattr(copied, "drop_path_prob", 0.0)
    copied.drop_path_prob = 0.0
    with torch.no_grad():
        for chunk in indices.split(batch_size):
            if len(chunk) > 1:
                copied(data.make(BatchJob(chunk))[0])
    copied.drop_path_prob = drop_path
    copied.eval()
    return copied
