"""Scaling of a DARTS search step over processes (fastdarts.distributed): 1 and 2 processes on the CPU, each with
1 thread, at the same global batch; samples per second, the bytes all-reduced per step and the all-reduce's share
of a step, and what the same bytes cost over 8 GPUs on paper.

    python benchmarks/distributed_scaling.py --json [--processes 1,2] [--batch 64] [--steps 5] [--order first]
                                            [--init_channels 16] [--layers 8] [--image_size 32]

Each process count runs in its own `python -m torch.distributed.run --nproc_per_node=P` (OMP_NUM_THREADS=1),
which runs this script with `--worker`: the search network on random images, one global batch per step split
across the processes, the step fastdarts.search takes (architecture step, weight step in DDP, the end-of-step
all-reduce of the run loop), one warm-up step, then `--steps` timed ones. One process is the plain run:
torchrun with one process starts no process group.

The all-reduce share is the time that all-reducing one step's bytes (one flat float32 tensor, as many bytes as
the step's collectives carry) takes on its own, over the median step time: an upper bound, since DDP overlaps
its all-reduce with the backward. Bytes per step: the weight gradient (DDP), the architecture gradient and the
validation loss (Architect.step), the training loss (its finiteness check), batch norm's running statistics and
the step's sums (in float64, runloop); a second-order step adds the virtual step's weight gradient and the
vector v. On paper, a ring all-reduce over N devices sends and receives 2 (N - 1) / N times those bytes per
device; the bandwidths are flags (defaults: `--nvlink_gbps 230`, about what NCCL's all-reduce reaches between
the 8 GPUs of an NVLink 3 machine such as a DGX A100, and 10 and 100 Gbit/s Ethernet between machines).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import torch

ORDERS = ("first", "second")


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", default="1,2", help="comma-separated process counts (default 1,2)")
    parser.add_argument("--batch", type=int, default=64, help="global batch (default 64, DARTS's)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step (default 5)")
    parser.add_argument("--order", choices=ORDERS, default="first", help="architecture step (default first)")
    parser.add_argument("--init_channels", type=int, default=16)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--nvlink_gbps", type=float, default=230.0, help="GB/s of an all-reduce over NVLink")
    parser.add_argument("--ethernet_gbps", default="1.25,12.5", help="GB/s between machines (10, 100 Gbit/s)")
    parser.add_argument("--devices", type=int, default=8, help="devices of the on-paper estimate (default 8)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batch < 2 * max(map(int, args.processes.split(","))):
        parser.error("--batch must give every process two images at least")
    return args


def worker(args: argparse.Namespace) -> None:
    """One process of a run: time the steps, then the all-reduce of one step's bytes; process 0 prints JSON."""
    import torch.distributed as dist

    from fastdarts import SearchNetwork, distributed, ops
    from fastdarts.bilevel import Architect, weight_step
    from fastdarts.data import part_slice

    world = distributed.world()
    torch.manual_seed(0)
    model = SearchNetwork(args.init_channels, 10, args.layers, 3)
    weight_optimizer = torch.optim.SGD(model.weight_parameters(), 0.025, momentum=0.9, weight_decay=3e-4)
    architect = Architect(model, weight_optimizer, unrolled=args.order == "second", world=world)
    forward = world.data_parallel(model, ignore=model.arch_parameters())
    keep = part_slice(args.batch, world.part)
    share = world.share(args.batch)
    size = args.image_size

    def batch(seed: int):  # the same global batch in every process, each taking its part
        g = torch.Generator().manual_seed(seed)
        x, y = torch.randn(args.batch, 3, size, size, generator=g), torch.randint(0, 10, (args.batch,), generator=g)
        return x[keep], y[keep]

    def step(i: int) -> float:
        train, val = batch(2 * i), batch(2 * i + 1)
        started = time.perf_counter()
        architect.step(train, val, 0.025, share, share)
        loss, logits = weight_step(model, weight_optimizer, train, 5.0, forward=forward, world=world, share=share)
        if not world.alone:  # the run loop's end of every step
            world.share_step(model, [loss.item() * len(train[0]), 0.0, len(train[0]), 0.0, 0.0])
        return time.perf_counter() - started

    step(0)
    seconds = [step(i) for i in range(1, args.steps + 1)]
    weights = sum(p.numel() for p in model.weight_parameters())
    arch = sum(p.numel() for p in model.arch_parameters())
    buffers = sum(b.numel() for b in model.buffers() if b.is_floating_point())
    per_step = 4 * (weights + arch + 2) + 8 * (buffers + 5) + (8 * weights if args.order == "second" else 0)
    allreduce = 0.0
    if not world.alone:
        flat = torch.zeros(per_step // 4)
        dist.all_reduce(flat)
        timed = []
        for _ in range(args.steps):
            dist.barrier()
            started = time.perf_counter()
            dist.all_reduce(flat)
            timed.append(time.perf_counter() - started)
        allreduce = statistics.median(timed)
    median = statistics.median(seconds)
    if world.writes:
        print(json.dumps({"processes": world.size, "median_step_seconds": median, "step_seconds": seconds,
                          "samples_per_second": args.batch / median, "weights": weights, "arch": arch,
                          "float_buffers": buffers, "bytes_all_reduced_per_step": per_step,
                          "all_reduce_seconds": allreduce, "all_reduce_share": allreduce / median,
                          "kernels": ops.describe_kernels()}))  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(args: argparse.Namespace, processes: int, argv: list[str]) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", os.path.abspath(__file__), *argv,
               "--worker"]  # fmt: skip
    child = subprocess.run(command, capture_output=True, text=True, timeout=3600,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    if child.returncode != 0:
        sys.exit(f"{processes} processes failed: {child.stderr.strip().splitlines()[-1:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def on_paper(bytes_per_step: int, devices: int, bandwidths: dict[str, float]) -> dict[str, float]:
    """Milliseconds of a ring all-reduce of `bytes_per_step` over `devices`, per link."""
    moved = 2 * (devices - 1) / devices * bytes_per_step
    return {name: 1e3 * moved / (gbps * 1e9) for name, gbps in bandwidths.items()}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.worker:
        worker(args)
        return 0
    runs = [measure(args, int(p), [a for a in argv if a != "--json"]) for p in args.processes.split(",")]
    base = runs[0]["samples_per_second"]
    for run in runs:
        run["speed-up"] = run["samples_per_second"] / base
    bandwidths = {f"nvlink {args.nvlink_gbps:g} GB/s": args.nvlink_gbps}
    bandwidths.update({f"ethernet {float(g):g} GB/s": float(g) for g in args.ethernet_gbps.split(",")})
    paper = on_paper(runs[0]["bytes_all_reduced_per_step"], args.devices, bandwidths)
    report = {"order": args.order, "global_batch": args.batch, "network": f"C={args.init_channels} "
              f"layers={args.layers} {args.image_size}x{args.image_size}", "runs": runs,
              f"all_reduce_ms_per_step_on_{args.devices}_devices": paper}  # fmt: skip
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{args.order}-order search step, global batch {args.batch}, {report['network']}; {runs[0]['kernels']}")
    print("processes | samples/s | speed-up | all-reduce s | all-reduce share | MB all-reduced per step")
    for run in runs:
        # One process starts no process group: it all-reduces nothing.
        megabytes = "-" if run["processes"] == 1 else f"{run['bytes_all_reduced_per_step'] / 1e6:.2f}"
        print(f"{run['processes']} | {run['samples_per_second']:.2f} | {run['speed-up']:.2f} | "
              f"{run['all_reduce_seconds']:.4f} | {run['all_reduce_share']:.3f} | {megabytes}")  # fmt: skip
    print(
        f"on paper, {args.devices} devices (ring all-reduce of {runs[0]['bytes_all_reduced_per_step'] / 1e6:.2f} "
        "MB), ms per step: " + ", ".join(f"{name}: {ms:.3f}" for name, ms in paper.items())
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
