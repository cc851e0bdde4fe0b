"""Time one step of DARTS's recurrent search per provider and count the bytes saved for backward.

    python benchmarks/rnn_search_step.py [--json] [--batch 256] [--nhid 300] [--bptt 35] [--ntoken 10000]
                                         [--repeats 3] [--providers eager,fused]

A step is the alpha step on a validation batch (first or second order, RNN.md 2.2-2.3) plus the weight step on a
training batch (NLL + TAR, clipped SGD), at DARTS's search size by default (batch 256, 300 units, bptt 35, a
10,000-word vocabulary, random tokens). Providers: "eager", DARTS's own computation of each node (every op's
highway update a tensor of its own); "fused", fastdarts.rnn.node (one matmul and ops.rnn_mixed_node per node, on
the device's backend: the C++ kernel on the CPU). Each (provider, order) case runs in a child process of its own,
so that its peak RSS is its own. "saved" counts the distinct storages autograd keeps for the weight step's
backward (the larger of a step's graphs). Both providers compute the loss with fastdarts.rnn.decoder (no logits
kept); the eager cell is the only difference.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys

import torch

if __package__:
    from . import _device, _report
else:  # run from a script: benchmarks/ is sys.path[0]
    import _device
    import _report

from fastdarts.rnn.loop import lm_weight_step
from fastdarts.rnn.model import RecurrentSearchModel
from fastdarts.rnn.search import RecurrentArchitect, RecurrentSearchConfig

PROVIDERS = {"eager": False, "fused": True}  # provider -> SearchCell(fused=...)
ORDERS = ("first", "second")


def make_problem(provider: str, order: str, batch: int, nhid: int, bptt: int, ntoken: int):
    torch.manual_seed(0)
    config = RecurrentSearchConfig(emsize=nhid, nhid=nhid, batch_size=batch, bptt=bptt, lr=RecurrentSearchConfig.PTB_LR,
                                   unrolled=order == "second")  # fmt: skip
    model = RecurrentSearchModel(ntoken, nhid, nhid, fused=PROVIDERS[provider])
    optimizer = torch.optim.SGD(model.weight_parameters(), config.lr, weight_decay=config.wdecay)
    architect = RecurrentArchitect(model, config)
    tokens = [torch.randint(0, ntoken, (bptt + 1, batch)) for _ in range(2)]
    train, val = ((t[:-1], t[1:].reshape(-1)) for t in tokens)
    return model, optimizer, architect, config, train, val


def saved_bytes_of_weight_step(model, x, y) -> int:
    """Bytes of the distinct storages autograd saves for the backward of the weight step's forward."""
    storages = {}

    def pack(t):  # keeps each storage alive, so that no address is reused and counted twice
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage

    def unpack(_):
        raise RuntimeError("the graph is built for counting only")

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        loss = model(x, model.init_hidden(x.shape[1]), y).loss
    del loss
    return sum(s.nbytes() for s in storages.values())


def run_case(provider: str, order: str, batch: int, nhid: int, bptt: int, ntoken: int, repeats: int) -> dict:
    model, optimizer, architect, config, train, val = make_problem(provider, order, batch, nhid, bptt, ntoken)
    hidden = model.init_hidden(batch)
    result = {"saved_bytes": saved_bytes_of_weight_step(model, *train)}

    def step():
        architect.step(train, val, hidden, hidden, config.lr)
        lm_weight_step(model, optimizer, *train, hidden, config.lr, config)

    result.update(_device.measure(step, _device.timer_for(torch.device("cpu"), repeats)[0], torch.device("cpu")))
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--nhid", type=int, default=300, help="hidden units = embedding size")
    parser.add_argument("--bptt", type=int, default=35)
    parser.add_argument("--ntoken", type=int, default=10000, help="vocabulary size")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per case (after one warm-up)")
    parser.add_argument("--providers", default=None, help=f"comma-separated, from {', '.join(PROVIDERS)}")
    parser.add_argument("--orders", default="first,second", help="first, second or both")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--in_process", action="store_true", help="run the cases in this process (no children)")
    parser.add_argument("--one_case", help=argparse.SUPPRESS)  # PROVIDER:ORDER, used by the parent
    args, device, peaks = _report.parse_device_args(parser, argv)
    shape = dict(batch=args.batch, nhid=args.nhid, bptt=args.bptt, ntoken=args.ntoken, repeats=args.repeats)
    if args.one_case:
        provider, order = args.one_case.split(":")
        print(json.dumps(run_case(provider, order, **shape)))
        return 0
    providers = _report.choices(parser, "providers", args.providers, PROVIDERS, list(PROVIDERS))
    orders = _report.choices(parser, "orders", args.orders, ORDERS)
    results: dict[str, dict] = {p: {} for p in providers}
    for order in orders:  # alternate providers inside each order, so drifting load hits them alike
        for provider in providers:
            if args.in_process:
                results[provider][order] = run_case(provider, order, **shape)
            else:
                results[provider][order] = _report.run_child(__file__, argv, f"{provider}:{order}")
    timer = _device.timer_for(torch.device("cpu"), args.repeats)[1]
    report = {"case": shape, **_report.common_fields(device, peaks, timer, []), "providers": results}
    rows = [
        f"{provider:>6} {order}-order: {c['median_seconds']:.3f} s median, saved for backward "
        f"{c['saved_bytes'] / 2**30:.3f} GiB, peak RSS {c['peak_rss_bytes'] / 2**30:.2f} GiB"
        for provider, r in results.items()
        for order, c in r.items()
    ]
    if "eager" in results and "fused" in results:
        for order in orders:
            eager, fused = results["eager"][order], results["fused"][order]
            rows.append(f"{order}-order, eager / fused: time {eager['median_seconds'] / fused['median_seconds']:.2f}x, "
                        f"saved bytes {eager['saved_bytes'] / fused['saved_bytes']:.2f}x")  # fmt: skip
    _report.print_report(report, args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
