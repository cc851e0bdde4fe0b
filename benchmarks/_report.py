"""The command line and the report that the device benchmarks (ops.py, mixed_op.py, search_step.py) share: their
common flags and process set-up, the comma-separated choices, one child process per case, the note that Triton is
skipped, and the report's common fields, printed as one JSON object or as a table under two header lines."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

if __package__:
    from . import _device
else:  # run from a script: benchmarks/ is sys.path[0]
    import _device


def parse_device_args(parser: argparse.ArgumentParser, argv=None) -> tuple[argparse.Namespace, torch.device, dict]:
    """Add --peak_gbps, --peak_gflops and --cpu_isa to the script's own flags, parse `argv`, set the process up
    (_device.prepare_process: with --cpu_isa it may restart itself first) and return the arguments, the device to
    run on and its peaks (_device.device_peaks)."""
    _device.add_peak_flags(parser)
    _device.add_cpu_isa_flag(parser)
    args = parser.parse_args(argv)
    _device.prepare_process(parser, args.cpu_isa)
    _device.check_peak_flags(parser, args)
    device = _device.benchmark_device()
    return args, device, _device.device_peaks(_device.device_name(device), args.peak_gbps, args.peak_gflops)


def choices(
    parser: argparse.ArgumentParser, flag: str, text: str | None, known: Sequence[str], default: Sequence[str] = ()
) -> list[str]:
    """The comma-separated values of --`flag` (`default` when it is not given); one that is not in `known` is a usage
    error naming it."""
    if text is None:
        return list(default)
    values = text.split(",")
    for value in values:
        if value not in known:
            parser.error(f"--{flag}: unknown {flag.removesuffix('s')} {value!r}; choose from {', '.join(known)}")
    return values


def run_child(script: str, argv, one_case: str) -> dict:
    """Run `script` again in a fresh process, with this process's flags (`argv`, or the command line's when None)
    and `--one_case ONE_CASE`, and return the JSON object it prints. A child that fails stops the benchmark with its
    last line of stderr; one that runs longer than _device.CHILD_TIMEOUT_SECONDS is stuck."""
    flags = sys.argv[1:] if argv is None else argv
    child = subprocess.run(
        [sys.executable, str(Path(script).resolve()), *flags, "--one_case", one_case],
        capture_output=True,
        text=True,
        timeout=_device.CHILD_TIMEOUT_SECONDS,
    )
    if child.returncode != 0:
        tail = child.stderr.strip().splitlines()[-1:] or [f"exit status {child.returncode}"]
        raise SystemExit(f"case {one_case} failed: {tail[0]}")
    return json.loads(child.stdout)


def triton_notes(providers: Sequence[str], device: torch.device) -> list[str]:
    """The report's notes, printed to stderr as well: one line when Triton is skipped because there is no GPU."""
    notes = [_device.TRITON_SKIPPED] if "triton" not in providers and device.type != "cuda" else []
    for note in notes:
        print(note, file=sys.stderr)
    return notes


def common_fields(device: torch.device, peaks: dict, timer: str, notes: list[str]) -> dict:
    """What every report says about the run: torch, threads, CPU, device and its peaks, timer, notes."""
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": _device.cpu_line(),
        "device_type": device.type,
        **peaks,
        "timer": timer,
        "notes": notes,
    }


def print_report(report: dict, as_json: bool, rows: Sequence[str]) -> None:
    """One JSON object; or the CPU line, the device with its peaks and the timer, then one table row a line."""
    if as_json:
        print(json.dumps(report, indent=2))
        return
    print(report["cpu"])
    print(f"{report['device']}; peaks {report['peaks_from']}; timer: {report['timer']}")
    for row in rows:
        print(row)
