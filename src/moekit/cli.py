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


def _params(args: argparse.Namespace) -> int:
    from moekit.analysis import params
    from moekit.presets import PRESETS

    kwargs = dict(context=args.context, batch=args.batch, kv_dtype=args.kv_dtype)
    if args.list:
        data = {name: cfg["source"] for name, cfg in PRESETS.items()}
        text = "\n".join(f"{name:<20}{source}" for name, source in data.items())
    elif args.published:
        data = params.published_comparison(context=args.context)
        text = params.format_published_table(data)
    elif args.compare:
        reports = [params.analyze(model, **kwargs) for model in args.compare]
        data, text = [r.to_dict() for r in reports], params.format_comparison(reports)
    else:
        report = params.analyze(args.model, **kwargs)
        data, text = report.to_dict(), params.format_report(report)
    print(json.dumps(data, indent=2) if args.json else text)
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

    params = sub.add_parser(
        "params",
        help="total and active parameters, FLOPs and memory of an MoE model (preset, config.json or HF folder)",
        description="Counts follow transformers' model.parameters(); see moekit.analysis.params for the conventions.",
    )
    what = params.add_mutually_exclusive_group(required=True)
    what.add_argument("model", nargs="?", help="a preset name (see --list), a config.json or a Hugging Face folder")
    what.add_argument("--compare", nargs="+", metavar="MODEL", help="several models side by side")
    what.add_argument("--published", action="store_true", help="our counts beside the published figures")
    what.add_argument("--list", action="store_true", help="list the presets and where their values come from")
    params.add_argument("--context", type=_positive, default=4096, help="context length for FLOPs and KV (4096)")
    params.add_argument("--batch", type=_positive, default=1, help="sequences in the KV cache (default 1)")
    params.add_argument("--kv-dtype", choices=("fp32", "bf16", "fp8", "int4"), default="bf16", help="KV cache dtype")
    params.add_argument("--json", action="store_true", help="machine-readable output")
    params.set_defaults(func=_params)
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
