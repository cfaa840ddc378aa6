"""`moekit <command>`: argument parsing and printing only; the work is done by the library."""

from __future__ import annotations

import argparse
import json
import sys


def _demo(args: argparse.Namespace) -> int:
    from moekit.demo import run_demo

    kwargs = dict(steps=args.steps, batch=args.batch, num_experts=args.experts, top_k=args.top_k, seed=args.seed)
    if args.json:
        print(json.dumps(run_demo(log=lambda *_: None, **kwargs).to_dict(), indent=2))
    else:
        run_demo(**kwargs)
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moekit", description="Mixture-of-Experts for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train an MoE layer beside a dense FFN on a mixture-of-tasks problem (~30 s)")
    demo.add_argument("--steps", type=_positive, default=300, help="optimizer steps (default 300)")
    demo.add_argument("--batch", type=_positive, default=512, help="tokens per step (default 512)")
    demo.add_argument("--experts", type=_positive, default=8, help="number of experts (default 8)")
    demo.add_argument("--top-k", type=_positive, default=2, help="experts per token (default 2)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--json", action="store_true", help="print the result as JSON instead of a log")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:  # configuration errors are the user's to fix: no traceback
        print(f"moekit: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
