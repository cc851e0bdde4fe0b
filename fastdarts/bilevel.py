"""The architecture step of DARTS's bilevel optimisation (METHOD.md 1.3): first and second order.

The second-order step never copies or rebuilds the model: the virtual weights `w'` and the
perturbed weights `w +- eps v` are plain tensors handed to `torch.func.functional_call`, so the
model's own parameters are never written (and never pick up rounding from a perturb-and-restore).

Over several processes (fastdarts.distributed) each step takes the process's part of the global batch and
its `share` of it; every gradient that feeds a decision or an update is summed over the processes first.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch.func import functional_call

from .distributed import SINGLE, World

Batch = tuple[torch.Tensor, torch.Tensor]


class NonFiniteError(FloatingPointError):
    """A loss or gradient became NaN or infinite; raised before any parameter is updated with it."""


class NonFiniteWeights(NonFiniteError):
    """A parameter became NaN or infinite in an update: no later step can repair it, so a run stops."""


def check_finite(value: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(value).all()):
        raise NonFiniteError(f"{what} is not finite")


def optimized_parameters(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The parameters `optimizer` updates (the weights, for the weight optimizer): read off the optimizer, where
    the supernet's weight_parameters() walks all its modules for its ~1,400 tensors, milliseconds a call."""
    return [p for group in optimizer.param_groups for p in group["params"]]


@contextlib.contextmanager
def frozen(params: Iterable[torch.Tensor]) -> Iterator[None]:
    """Parameters that need no gradient in this block: autograd then saves nothing for them
    (in the DARTS supernet, about a sixth of the activations saved for backward)."""
    params = [p for p in params if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def weight_step(model, optimizer: torch.optim.Optimizer, batch: Batch, grad_clip: float | None,
                loss_fn=F.cross_entropy, *, forward=None, world: World = SINGLE, share: float = 1.0):  # fmt: skip
    """One SGD step of the weights on `batch` (architecture fixed); returns the loss and the logits.
    `forward`: what runs the model (its DistributedDataParallel wrapper over several processes). The forward
    runs inside the method's `weight_step` context (SDARTS perturbs the edge weights there)."""
    optimizer.zero_grad(set_to_none=True)
    with frozen(model.arch_parameters()), model.method.weight_step(model, batch, loss_fn):
        logits = (forward or model)(batch[0])
        loss = loss_fn(logits, batch[1])
    sgd_step(optimizer, optimized_parameters(optimizer), loss, grad_clip, world=world, share=share)
    return loss.detach(), logits.detach()


def sgd_step(optimizer: torch.optim.Optimizer, params, loss: torch.Tensor, grad_clip: float | None, *,
             world: World = SINGLE, share: float = 1.0) -> None:  # fmt: skip
    """Backward, clip the gradient norm of `params`, step. A non-finite loss or gradient raises
    NonFiniteError before any parameter changes.

    Over several processes `loss` is this process's part's, `share` its fraction of the global batch, and the
    backward runs through DistributedDataParallel; the loss is checked summed over the processes, so that every
    process stops, or goes on, together."""
    params = list(params)
    if world.alone:
        check_finite(loss, "the training loss")
        loss.backward()
    else:
        total = loss.detach() * share
        world.sum_([total])
        check_finite(total, "the training loss")
        # DDP averages the gradients over the processes: each loss weighted by size * share makes that average
        # the gradient of the global batch's mean loss, also when the parts are uneven.
        (loss * (share * world.size)).backward()
    # clip_grad_norm_'s norm and scaling, the scaling only where it changes something: torch multiplies every
    # gradient by min(grad_clip / (norm + 1e-6), 1), a pass over the supernet's ~1,400 tensors even when that is 1.
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], foreach=True)
    if grad_clip is not None and bool(grad_clip / (grad_norm + 1e-6) < 1):
        torch.nn.utils.clip_grads_with_norm_(params, grad_clip, grad_norm, foreach=True)
    check_finite(grad_norm, "the weight gradient")
    optimizer.step()
    # SGD moves only the weights that have a gradient (a sampling method's step leaves most without one)
    if not weights_finite([p for p in params if p.grad is not None]):
        raise NonFiniteWeights("a weight became non-finite in the update")


def weights_finite(params: list[torch.Tensor]) -> bool:
    """Whether every value of `params` is finite: a finite but huge gradient can still overflow a weight.

    The 2-norm is finite when every weight is (NaN and infinity propagate through it); only when it is not, the
    max-norm, which is finite exactly when every weight is, tells a non-finite weight from squares past the float
    range. On the CPU torch's foreach 2-norm of the supernet's ~1,400 tensors takes about a third of the max-norm's
    time (2.6 against 7.2-7.7 ms); left to itself, torch takes CPU tensors one norm call at a time."""
    norm = torch.nn.utils.get_total_norm
    if bool(torch.isfinite(norm(params, norm_type=2.0, foreach=True))):
        return True
    return bool(torch.isfinite(norm(params, norm_type=float("inf"), foreach=True)))


class Architect:
    """Updates a model's architecture parameters with Adam on the validation loss.

    The model must provide `arch_parameters()`, `named_weight_parameters()`, `regulariser()` (a term
    added to the validation loss, for the forward pass just run, or None) and `samples_each_forward`.
    The architecture objective is `loss_fn(logits, y) + regulariser()`; the training loss of the
    virtual step and of the Hessian-vector product is `loss_fn` alone, since the weights minimise it.
    `weight_optimizer` is the SGD optimizer of the weights: the second-order step reads its
    momentum, weight decay and momentum buffers to form the virtual step, exactly as the next
    real weight step would. `hessian_r` sets the finite-difference step of the Hessian-vector
    product: the weights move by `hessian_r` in L2 norm (DARTS: 0.01).

    Over several processes (`world`) each process differentiates its term of the global objective: its share
    of the mean loss of the global batch, plus the regulariser divided by the number of processes (its gates
    are the same in every process). The sum over the processes is the global gradient: the first-order
    gradient is summed in `step`; the second order sums the virtual step's weight gradient and the vector `v`
    as soon as they are computed (the virtual weights and the finite-difference step `eps` depend on them),
    and `grad_alpha L_val(w') - xi * (grad_alpha L_train(w + eps v) - grad_alpha L_train(w - eps v)) / 2 eps`,
    linear in its three gradients once `eps` is common, is summed once in `step`: the sum of each gradient
    over the processes, combined.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        weight_optimizer: torch.optim.Optimizer,
        *,
        arch_learning_rate: float = 3e-4,
        arch_betas: tuple[float, float] = (0.5, 0.999),
        arch_weight_decay: float = 1e-3,
        unrolled: bool = False,
        hessian_r: float = 0.01,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
        world: World = SINGLE,
    ):
        if unrolled and model.samples_each_forward:
            # The finite differences compare forward passes, which would each draw other edge weights.
            raise ValueError(
                "Architect: the second-order (unrolled) step needs the same edge weights in every forward pass; "
                "this model's method samples new ones each time, so use the first-order step"
            )
        arch = {id(p) for p in model.arch_parameters()}
        if any(id(p) in arch for p in optimized_parameters(weight_optimizer)):
            # The first-order step freezes the optimizer's parameters as the weights.
            raise ValueError(
                "Architect: the weight optimizer updates architecture parameters; give it the weights only"
            )
        self.model = model
        self.weight_optimizer = weight_optimizer
        self.unrolled = unrolled
        self.hessian_r = hessian_r
        self.loss_fn = loss_fn
        self.world = world
        self.optimizer = torch.optim.Adam(
            model.arch_parameters(), lr=arch_learning_rate, betas=arch_betas, weight_decay=arch_weight_decay
        )

    def step(self, train_batch: Batch, val_batch: Batch, lr: float, train_share: float = 1.0,
             val_share: float = 1.0) -> torch.Tensor:  # fmt: skip
        """One Adam step on the architecture; `lr` is the current weight learning rate (xi); the shares are
        the batches' fractions of the global ones over several processes.

        Returns the validation objective it differentiated (at `w`, or at the virtual `w'` when unrolled).
        """
        if self.unrolled:
            grads, val_loss = self.second_order_grads(train_batch, val_batch, lr, train_share, val_share)
        else:
            grads, val_loss = self.first_order_grads(val_batch, val_share)
        self.world.sum_([*grads, val_loss])  # DDP does not see torch.autograd.grad, nor the architecture
        check_finite(val_loss, "the validation loss")
        check_finite(torch.stack([g.norm() for g in grads]), "the architecture gradient")
        for p, g in zip(self.model.arch_parameters(), grads):
            p.grad = g
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return val_loss

    def loss(self, batch: Batch, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        x, y = batch
        logits = self.model(x) if params is None else functional_call(self.model, params, (x,))
        return self.loss_fn(logits, y)

    def share_of(self, loss: torch.Tensor, share: float) -> torch.Tensor:
        """This process's term of the global batch's mean loss (the loss itself alone)."""
        return loss if self.world.alone else loss * share

    def objective(self, batch: Batch, params: dict[str, torch.Tensor] | None = None,
                  share: float = 1.0) -> torch.Tensor:  # fmt: skip
        """The architecture objective: the loss plus the model's regulariser of the forward pass just run
        (this process's term of it over several processes)."""
        loss = self.share_of(self.loss(batch, params), share)
        regulariser = self.model.regulariser()
        if regulariser is not None and not self.world.alone:
            regulariser = regulariser / self.world.size
        return loss if regulariser is None else loss + regulariser

    def first_order_grads(self, val_batch: Batch, share: float = 1.0) -> tuple[list[torch.Tensor], torch.Tensor]:
        """`grad_alpha L_val(w, alpha)`; autograd neither computes nor keeps anything for weight gradients."""
        with frozen(optimized_parameters(self.weight_optimizer)):
            loss = self.objective(val_batch, share=share)
            # A sampled cell may take a cell type off every path to the loss (GDAS: normal cells whose sampled
            # ops all ignore the previous cell, a reduction cell): that type's architecture gets a zero gradient.
            grads = torch.autograd.grad(loss, self.model.arch_parameters(), materialize_grads=True)
        return list(grads), loss.detach()

    def second_order_grads(self, train_batch: Batch, val_batch: Batch, lr: float, train_share: float = 1.0,
                           val_share: float = 1.0):  # fmt: skip
        """`grad_alpha L_val(w', alpha) - xi * H v` with a central finite-difference Hessian-vector product."""
        arch = self.model.arch_parameters()
        names, weights = zip(*self.model.named_weight_parameters())
        group = self.weight_optimizer.param_groups[0]
        momentum, weight_decay = group.get("momentum", 0.0), group.get("weight_decay", 0.0)

        # The virtual SGD step w' = w - xi (mu buf + grad_w L_train + lambda w), unclipped.
        with frozen(arch):
            train_loss = self.share_of(self.loss(train_batch), train_share)
            train_grads = torch.autograd.grad(train_loss, weights, materialize_grads=True)
        self.world.sum_(train_grads)
        with torch.no_grad():
            virtual = []
            for w, g in zip(weights, train_grads):
                buf = self.weight_optimizer.state.get(w, {}).get("momentum_buffer")
                step = g + weight_decay * w
                if buf is not None:
                    step = step + momentum * buf
                virtual.append((w - lr * step).requires_grad_())
        # The virtual model's batch-norm running statistics are a throwaway copy, as in DARTS.
        buffers = {n: b.clone() for n, b in self.model.named_buffers()}
        val_loss = self.objective(val_batch, {**dict(zip(names, virtual)), **buffers}, val_share)
        grads = torch.autograd.grad(val_loss, [*arch, *virtual], materialize_grads=True)
        arch_grads, v = grads[: len(arch)], grads[len(arch) :]
        self.world.sum_(v)

        implicit = self.hessian_vector_product(train_batch, names, weights, v, train_share)
        return [g - lr * h for g, h in zip(arch_grads, implicit)], val_loss.detach()

    def hessian_vector_product(self, train_batch, names, weights, v, share: float = 1.0) -> list[torch.Tensor]:
        """`(grad_alpha L_train(w + eps v) - grad_alpha L_train(w - eps v)) / (2 eps)`, `eps = r / ||v||`."""
        arch = self.model.arch_parameters()
        eps = self.hessian_r / torch.linalg.vector_norm(torch.cat([t.reshape(-1) for t in v]))
        grads = []
        for sign in (1.0, -1.0):
            with torch.no_grad():
                perturbed = {n: w + sign * eps * t for n, w, t in zip(names, weights, v)}
            loss = self.share_of(self.loss(train_batch, perturbed), share)
            grads.append(torch.autograd.grad(loss, arch, materialize_grads=True))
        return [(gp - gm) / (2 * eps) for gp, gm in zip(*grads)]
