"""The command line of scripts/bench_peers.py: its options, and main(), which measures and
writes the report, or (``--worker SPEC OUT``) is one worker subprocess."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

from .plan import MODELS, ROOT, SCRIPT, TASKS, TOOLS
from .report import print_summary, render, to_json
from .run import measure
from .worker import worker_main

DESCRIPTION = (
    "Peer benchmark: mlxpost against TRL, mlx-lm's LoRA trainer and mlx-lm-lora, on the same work."
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny model, few steps")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma separated: sft,grpo,dpo")
    parser.add_argument(
        "--tools", default=",".join(TOOLS), help=f"comma separated: {','.join(TOOLS)}"
    )
    parser.add_argument(
        "--models",
        default=None,
        help="comma separated: tiny,gpt2-124m (default: both; --quick: tiny)",
    )
    parser.add_argument(
        "--steps", type=int, default=0, help="timed steps for every row (0: the plan's)"
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed steps first (default: the plan's)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--matmul-size", type=int, default=1024, help="square matmul for the peak FLOP/s"
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=0,
        help="torch.set_num_threads(N) in torch workers (0: default)",
    )
    parser.add_argument("--timeout", type=int, default=900, help="seconds per subprocess")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run the whole job list N times round-robin and pool the timed steps",
    )
    parser.add_argument(
        "--mlx-preload",
        default="",
        metavar="LIB",
        help="LD_PRELOAD for MLX workers, e.g. Debian's OpenBLAS "
        "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 (the MLX Linux wheel's own "
        "BLAS is a slow reference one)",
    )
    parser.add_argument(
        "--markdown",
        default=os.path.join(ROOT, "docs", "bench_peers.md"),
        help="markdown report path ('' to skip)",
    )
    parser.add_argument("--json", metavar="FILE", help="also write every figure to FILE")
    parser.add_argument("--keep-temp", action="store_true", help="keep models, data and logs")
    parser.add_argument("--worker", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return args
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    args.tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    default_models = "tiny" if args.quick else ",".join(MODELS)
    args.models = [m.strip() for m in (args.models or default_models).split(",") if m.strip()]
    for name, given, known in (
        ("tasks", args.tasks, TASKS),
        ("tools", args.tools, tuple(TOOLS)),
        ("models", args.models, MODELS),
    ):
        unknown = sorted(set(given) - set(known))
        if unknown:
            parser.error(f"unknown {name} {unknown}; choose from {', '.join(known)}")
    if args.steps < 0 or (args.warmup is not None and args.warmup < 0):
        parser.error("--steps and --warmup must be at least 0")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.mlx_preload and not os.path.isfile(args.mlx_preload):
        parser.error(f"--mlx-preload {args.mlx_preload}: no such file")
    return args


def command_line(argv: list[str]) -> str:
    script = os.path.relpath(SCRIPT, ROOT)
    return "python " + " ".join(shlex.quote(a) for a in [script, *argv])


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        worker_main(*args.worker)
        return
    report = measure(args)
    command = command_line(argv)
    print_summary(report)
    markdown = render(report, command)
    if args.markdown:
        os.makedirs(os.path.dirname(os.path.abspath(args.markdown)), exist_ok=True)
        with open(args.markdown, "w") as f:
            f.write(markdown)
        print(f"wrote {args.markdown}")
    else:
        print(markdown)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(to_json(report), f, indent=2, default=str)
        print(f"wrote {args.json}")
    print(f"wall time: {report['wall_seconds']:.0f} s")
