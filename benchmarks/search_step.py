"""Time one search step per provider and count the bytes saved for backward.

    python benchmarks/search_step.py --json [--batch 64] [--repeats 3] [--providers reference,cpp]
                                     [--method M [--method_settings JSON]] [--peak_gbps G --peak_gflops F]

The step is that of `--method` (default darts; any name of fastdarts.methods.METHODS, built with the keyword
arguments of `--method_settings`, such as '{"variant": "adv"}' for sdarts), in the method's order (weights
first for PR-DARTS), on the eager reference and on the fused kernels alike; a method that samples its edge
weights in every forward pass has no second-order step.

A first-order step is an architecture step on one batch plus a weight step on another; a
second-order step replaces the architecture step by the unrolled one (METHOD.md 1.3). The
network is `SearchNetwork(C=16, layers=8, num_classes=10)` on random 3x32x32 data unless the
flags say otherwise. Providers: the eager reference with contiguous and with channels_last
activations, the fused kernels ("cpp" on the CPU, "triton" on CUDA; "cpp-no-recompute" keeps each edge's
intermediates instead of recomputing them, not run by default), and torch.compile of the reference
network ("compile", not run by default: it compiles the whole supernet). One command measures every provider and order,
alternating between them; each (provider, order) case runs in a fresh child process so that its peak RSS is its own and
one case's freed-but-fragmented heap cannot push the next one out of memory.

On a CUDA device (torch.cuda.is_available()) the network and data live there and the providers are
reference-contiguous, reference and triton (on the CPU, where Triton does not time, one printed line says it is
skipped). There each case is timed with CUDA events (do_bench,
about 1 s of steps after its warm-up; --repeats applies to the CPU only) and also reports its peak device
memory and its GFLOP/s: the FLOPs of one step of the eager network as benchmarks/_device.count_flops counts
them (convs and matmuls, forward and backward, counted in one extra step before the timing), against the peak
of --peak_gflops or the device table. No GB/s: a whole step has no byte floor worth quoting (ops.py and
mixed_op.py report GB/s per op). On the CPU the FLOPs are not counted (DESIGN.md 3 gives about 115 GFLOP per
forward + backward at batch 64), since the extra step would cost as much as a timed one.
Prints one JSON object (with --json) or a table; the Triton line goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys

import torch
import torch.nn.functional as F

from fastdarts import SearchNetwork, ops
from fastdarts.bilevel import Architect, frozen, weight_step
from fastdarts.memory import objects_so_far_frozen
from fastdarts.methods import METHODS, make_method

if __package__:
    from . import _device, _report
else:  # run as a script: benchmarks/ is sys.path[0]
    import _device
    import _report

ORDERS = ("first", "second")
CUDA_REP_MS = 1000  # do_bench's timed span per case: a step takes tens of milliseconds or more


# provider -> (ops backend, memory layout of the network's activations, torch.compile the network?, recompute?)
PROVIDERS = {
    "reference-contiguous": ("reference", torch.contiguous_format, False, True),
    "reference": ("reference", torch.channels_last, False, True),
    "cpp": ("cpp", torch.channels_last, False, True),
    "cpp-no-recompute": ("cpp", torch.channels_last, False, False),
    "compile": ("reference", torch.channels_last, True, True),
    "triton": ("triton", torch.channels_last, False, True),
}


def default_providers(device: torch.device) -> list[str]:
    """reference-contiguous, reference and the fused kernels of `device` (cpp on the CPU, triton on CUDA)."""
    fused = "triton" if device.type == "cuda" else "cpp"
    available = ops.available_backends(device=device)
    return [p for p in ("reference-contiguous", "reference", fused) if PROVIDERS[p][0] in available]


def make_problem(
    batch: int, C: int, layers: int, size: int, seed: int = 0, memory_format=torch.channels_last, device="cpu",
    recompute: bool = True, method: str = "darts", method_settings: dict | None = None,
):  # fmt: skip
    torch.manual_seed(seed)  # the model and the data are drawn on the CPU, so every device gets the same numbers
    method = make_method(method, **(method_settings or {}))
    model = SearchNetwork(C=C, num_classes=10, layers=layers, in_channels=3, memory_format=memory_format,
                          recompute=recompute, method=method).to(device)  # fmt: skip
    weight_optimizer = torch.optim.SGD(model.weight_parameters(), 0.025, momentum=0.9, weight_decay=3e-4, foreach=True)
    batches = [(torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))) for _ in range(2)]
    return model, weight_optimizer, [(x.to(device), y.to(device)) for x, y in batches]


def search_step(model, weight_optimizer, architect, train_batch, val_batch, lr=0.025):
    if model.method.weight_step_first:
        weight_step(model, weight_optimizer, train_batch, grad_clip=5.0)
        architect.step(train_batch, val_batch, lr)
    else:
        architect.step(train_batch, val_batch, lr)
        weight_step(model, weight_optimizer, train_batch, grad_clip=5.0)


def saved_bytes_of_forward(model, x, y, frozen_params=()) -> int:
    """Bytes of the distinct storages autograd saves for the backward of one training forward."""
    storages = {}

    # The graph is only measured, never run backward. The hook keeps each storage alive (so no
    # address is reused and counted twice) but not the tensor: a tensor would tie each output to
    # its own grad_fn in a reference cycle that outlives `loss`.
    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage

    def unpack(_):
        raise RuntimeError("saved_bytes_of_forward builds a graph for counting only")

    with frozen(frozen_params), torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        loss = F.cross_entropy(model(x), y)
    del loss
    return sum(s.nbytes() for s in storages.values())


def saved_bytes_of_step(model, x, y) -> dict[str, int]:
    """The two graphs of a first-order step: the architecture step keeps nothing for weight
    gradients, the weight step nothing for architecture gradients."""
    arch = saved_bytes_of_forward(model, x, y, model.weight_parameters())
    weight = saved_bytes_of_forward(model, x, y, model.arch_parameters())
    return {"saved_bytes": max(arch, weight), "saved_bytes_arch_step": arch, "saved_bytes_weight_step": weight}


def run_case(
    provider: str, order: str, batch: int, C: int, layers: int, size: int, repeats: int, device="cpu", peaks=None,
    method: str = "darts", method_settings: dict | None = None,
) -> dict:  # fmt: skip
    """One (provider, order) case in this process, on `device` (CUDA: also FLOPs and peak device memory)."""
    device = torch.device(device)
    backend, memory_format, compiled, recompute = PROVIDERS[provider]
    model, weight_optimizer, batches = make_problem(
        batch, C, layers, size, memory_format=memory_format, device=device, recompute=recompute, method=method,
        method_settings=method_settings,
    )  # fmt: skip
    train_batch, val_batch = batches
    with ops.use_backend(backend):
        result = saved_bytes_of_step(model, *train_batch)
        architect = Architect(model, weight_optimizer, unrolled=order == "second")

        def step():
            search_step(model, weight_optimizer, architect, train_batch, val_batch)

        flops = _device.count_flops(step) if device.type == "cuda" else None  # eager, before any compile
        if compiled:  # after counting: the compiled graph's saved tensors are inductor's business
            model.compile()
        with objects_so_far_frozen():  # as a search's loop runs its steps, for every provider alike
            result.update(_device.measure(step, _device.timer_for(device, repeats, CUDA_REP_MS)[0], device))
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if flops is not None:
        result.update(_device.throughput(result["median_seconds"], peaks or {}, flops))
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--init_channels", type=int, default=16)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--size", type=int, default=32, help="image height and width")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per case (after one warm-up)")
    parser.add_argument(
        "--providers", default=None,
        help=f"comma-separated, from {', '.join(PROVIDERS)} (default: reference-contiguous, reference and the "
        "device's fused kernels: cpp on the CPU, triton on CUDA)",
    )  # fmt: skip
    parser.add_argument("--orders", default=None, help="first, second or both (default: both; first alone for a "
                        "method that samples its edge weights)")  # fmt: skip
    parser.add_argument("--method", default="darts", choices=tuple(METHODS), help="the search method (default darts)")
    parser.add_argument("--method_settings", type=json.loads, default={}, metavar="JSON",
                        help="the method's keyword arguments, a JSON object (default: its own defaults)")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--in_process", action="store_true", help="run the cases in this process (no children)")
    parser.add_argument("--one_case", help=argparse.SUPPRESS)  # PROVIDER:ORDER, used by the parent
    args, device, peaks = _report.parse_device_args(parser, argv)
    shape = dict(batch=args.batch, C=args.init_channels, layers=args.layers, size=args.size, repeats=args.repeats)
    if not isinstance(args.method_settings, dict):
        parser.error(f"--method_settings must be a JSON object, got {args.method_settings!r}")
    try:
        sampling = make_method(args.method, **args.method_settings).samples_each_forward
    except (TypeError, ValueError) as e:
        parser.error(f"--method_settings: {e}")
    shape.update(method=args.method, method_settings=args.method_settings)
    if args.one_case:
        provider, order = args.one_case.split(":")
        print(json.dumps(run_case(provider, order, **shape, device=device, peaks=peaks)))
        return 0

    providers = _report.choices(parser, "providers", args.providers, PROVIDERS, default_providers(device))
    for provider in providers:
        if PROVIDERS[provider][0] not in ops.available_backends(device=device):
            parser.error(f"--providers: {provider} does not run on {device.type} tensors in this process")
    orders = _report.choices(parser, "orders", args.orders, ORDERS, ORDERS[:1] if sampling else ORDERS)
    if sampling and "second" in orders:
        parser.error(f"--orders: {args.method} samples its edge weights in every forward pass: first order only")
    notes = _report.triton_notes(providers, device)
    results: dict[str, dict] = {p: {} for p in providers}
    for order in orders:  # alternate providers inside each order, so drifting load hits them alike
        for provider in providers:
            if args.in_process:
                results[provider][order] = run_case(provider, order, **shape, device=device, peaks=peaks)
            else:
                results[provider][order] = _report.run_child(__file__, argv, f"{provider}:{order}")
    timer = _device.timer_for(device, args.repeats, CUDA_REP_MS)[1]
    report = {"case": {**shape, "num_classes": 10}, **_report.common_fields(device, peaks, timer, notes),
              "providers": results}  # fmt: skip
    rows = [
        f"{provider:>20} {order}-order: {c['median_seconds']:.3f} s median, "
        f"saved for backward {c['saved_bytes'] / 2**30:.3f} GiB, "
        f"peak RSS {c['peak_rss_bytes'] / 2**30:.2f} GiB" + _device.describe(c)
        for provider, r in results.items()
        for order, c in r.items()
    ]
    _report.print_report(report, args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
