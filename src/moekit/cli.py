"""`moekit <command>`: argument parsing and printing only; the work is done by the library."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
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


def _train(args: argparse.Namespace) -> int:
    from moekit.train import train, training_config
    from moekit.train.trainer import run_name

    world = int(os.environ.get("WORLD_SIZE", "1"))  # > 1 under torchrun
    if args.nproc is not None and world > 1:
        raise ValueError(f"--nproc starts torchrun itself: drop it when launching with torchrun (WORLD_SIZE={world})")
    if args.ep is None and (args.nproc or world) > 1:
        args.ep = args.nproc or world  # all the processes: pure expert parallelism
    options = {k: v for k, v in vars(args).items() if k in _TRAIN_FIELDS and v is not None}
    if "out" not in options and "preset" in options:
        options["out"] = f"runs/{run_name(options['preset'])}"
    config = training_config(options, resume=args.resume)
    if args.nproc is not None:
        _check_processes(config, args.nproc, args.resume, args.overwrite)
        if args.nproc > 1:
            return _launch(args, config.ep)
    log = (lambda *_: None) if args.json else print
    result = train(config, resume=args.resume, overwrite=args.overwrite, log=log)
    if os.environ.get("RANK", "0") != "0":  # under torchrun every rank returns the result; rank 0 reports it
        return 0
    summary = {k: v for k, v in vars(result).items() if k != "history"}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        val = "n/a" if result.val_loss is None else f"{result.val_loss:.4f}"
        print(
            f"done: {result.steps} steps, {result.tokens:,} tokens in {result.seconds:.0f} s; "
            f"loss {result.final_loss:.4f}, val_loss {val}\n"
            f"checkpoint {result.checkpoint}\nmetrics {result.run_dir}/metrics.jsonl, plot {result.run_dir}/loss.png"
        )
    return 0


def _check_processes(config, nproc: int, resume: bool, overwrite: bool) -> None:
    """Refuse, before starting any process, a run that `nproc` processes cannot do (the ranks would each say so)."""
    from moekit.parallel import check_expert_parallel
    from moekit.train.checkpoint import find_checkpoint
    from moekit.train.trainer import build_model_config

    if nproc % config.ep:
        raise ValueError(f"--ep {config.ep} must divide --nproc {nproc} (ep x data-parallel = nproc processes)")
    if nproc == 1:
        return
    if config.batch_size % nproc:
        raise ValueError(
            f"--batch-size {config.batch_size} must be divisible by --nproc {nproc} (each process takes an equal share)"
        )
    model = build_model_config(config.preset, 257, config.seq_len)
    if model.moe is None:
        raise ValueError(f"preset {config.preset!r} has no MoE layer: --nproc trains with expert parallelism")
    check_expert_parallel(model.moe, config.ep, nproc)
    if not (resume or overwrite) and os.path.isdir(config.out) and find_checkpoint(config.out) is not None:
        raise ValueError(f"{config.out!r} already holds a run: pass --resume to continue it or --overwrite")


def _launch(args: argparse.Namespace, ep: int) -> int:
    """Run this `moekit train` on args.nproc processes through torchrun (its Python entry point, so no script needs
    to be on PATH); its output streams through, and its exit status (non-zero if any rank failed) is returned."""
    child = ["train", "--ep", str(ep)]
    for action in args.train_parser._actions:
        value = getattr(args, action.dest, None)
        if action.dest in ("help", "nproc", "ep") or value is None or value is False:
            continue
        child += [action.option_strings[-1]] if value is True else [action.option_strings[-1], str(value)]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
        "-m", "moekit", *child,
    ]
    process = subprocess.Popen(command)
    try:
        return process.wait()
    except KeyboardInterrupt:  # torchrun stops its ranks on SIGTERM; wait for it so none is left behind
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        raise


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _generate(args: argparse.Namespace) -> int:
    from moekit.train import generate_text, load_model

    if args.hf is not None:
        from moekit.hf import load_pretrained, load_tokenizer

        device = "cuda" if args.device == "auto" and _cuda() else ("cpu" if args.device == "auto" else args.device)
        model = load_pretrained(args.hf, dtype=args.dtype, device=device, max_seq_len=args.max_seq_len)
        tokenizer, start_ids = load_tokenizer(args.hf)
    else:
        model, tokenizer, _ = load_model(args.checkpoint, args.device)
        start_ids = None
    print(args.prompt, end="", flush=True)
    result = generate_text(
        model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.greedy,
        args.seed, on_text=lambda text: print(text, end="", flush=True), start_ids=start_ids,
    )
    print()
    print(
        f"[{result.new_tokens} tokens in {result.seconds:.2f} s: {result.tokens_per_second:.1f} tokens/s]",
        file=sys.stderr,
    )
    return 0


def _compare(args: argparse.Namespace) -> int:
    from moekit.train import CompareConfig, compare

    fields = {"moe", "dense", "tokens", "out", "batch_size", "seq_len", "eval_every", "seed", "data", "tokenizer",
              "vocab_size", "text_field", "bf16", "device"}
    config = CompareConfig(**{k: v for k, v in vars(args).items() if k in fields and v is not None})
    result = compare(config, log=(lambda *_: None) if args.json else print)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print()
        print(result.markdown())
        print(f"\nplot {result.out}/compare.png, table {result.out}/compare.md and {result.out}/compare.json")
    return 0


def _analyze(args: argparse.Namespace) -> int:
    from moekit.analysis.report import analyze_routing_report, format_summary

    analysis, files = analyze_routing_report(
        args.out, checkpoint=args.checkpoint, hf=args.hf, data=args.data, text_field=args.text_field or "text",
        max_tokens=args.max_tokens, seq_len=args.seq_len, batch_size=args.batch_size, shuffles=args.shuffles,
        device=args.device, dtype=args.dtype, seed=args.seed, log=(lambda *_: None) if args.json else print,
    )
    if args.json:
        print(json.dumps({"report": str(files.html), "json": str(files.json), "warnings": analysis.warnings}, indent=2))
    else:
        print(format_summary(analysis))
        print(f"report {files.html}\nnumbers {files.json}, figures {', '.join(str(p) for p in files.figures.values())}")
    return 0


def _train_vision(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from moekit.train.vision import VisionTrainConfig, train_vision

    presets = ["tiny-vit", "tiny-vmoe"] if args.compare else [args.preset]
    log = (lambda _: None) if args.json else print
    options = {k: v for k, v in (("steps", args.steps), ("batch_size", args.batch_size), ("lr", args.lr),
                                 ("seed", args.seed), ("eval_every", args.eval_every),
                                 ("train_images", args.train_images)) if v is not None}
    results = []
    for preset in presets:
        out = None if args.out is None else (f"{args.out}/{preset}" if args.compare else args.out)
        results.append(train_vision(VisionTrainConfig(preset=preset, out=out, **options), log=log))
    if args.json:
        print(json.dumps([{k: v for k, v in asdict(r).items() if k != "history"} for r in results], indent=2))
        return 0
    print("\n| model | val accuracy | val loss | active params | total params | seconds |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r.preset} | {r.val_accuracy:.3f} | {r.val_loss:.3f} | {r.active_params:,} | {r.params:,} | "
              f"{r.seconds:.0f} |")
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
    _add_train(sub)
    _add_generate(sub)
    _add_compare(sub)
    _add_analyze(sub)
    _add_train_vision(sub)
    return parser


_TRAIN_FIELDS = {
    "preset", "data", "out", "steps", "batch_size", "seq_len", "grad_accum", "lr", "warmup", "clip", "bf16", "seed",
    "eval_every", "save_every", "keep_checkpoints", "tokenizer", "vocab_size", "max_tokens", "text_field", "device",
    "weight_decay", "ep", "dist_timeout",
}


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", help="a text file, a folder of text files, or a .jsonl file (default: the embedded "
                        "corpus of Python's documentation and standard-library sources)")
    parser.add_argument("--text-field", help="JSONL field holding the text (default 'text')")
    parser.add_argument("--tokenizer", choices=("bpe", "bytes"), help="byte-level BPE trained on the data (default) "
                        "or raw bytes")
    parser.add_argument("--vocab-size", type=_positive, help="BPE vocabulary size (default 4096)")


def _add_train(sub) -> None:
    # Defaults are None here so that --resume can tell the flags given from those left out (TrainConfig holds the
    # real defaults; `moekit train -h` shows them).
    train = sub.add_parser("train", help="train a language model from a preset on local text (or the embedded corpus)",
                           description="Train a tiny LM; see moekit.train.TrainConfig for every default.")
    from moekit.presets import list_presets

    train.add_argument("--preset", help=f"model preset (default tiny-mixtral): {', '.join(list_presets())}; or a "
                       "ModelConfig .json file")
    train.add_argument("--out", help="run directory (default runs/<preset>)")
    _add_data_options(train)
    train.add_argument("--max-tokens", type=_positive, help="use only the first N tokens of the training split")
    train.add_argument("--steps", type=_positive, help="optimizer steps (default 200)")
    train.add_argument("--batch-size", type=_positive, help="windows per micro-batch (default 16)")
    train.add_argument("--seq-len", type=_positive, help="tokens per window (default 128)")
    train.add_argument("--grad-accum", type=_positive, help="micro-batches per optimizer step (default 1)")
    train.add_argument("--lr", type=float, help="peak learning rate (default 3e-3)")
    train.add_argument("--warmup", type=int, help="linear warmup steps before the cosine decay (default 30)")
    train.add_argument("--weight-decay", type=float, help="AdamW weight decay on matrices (default 0.1)")
    train.add_argument("--clip", type=float, help="gradient-norm clip, 0 = off (default 1.0)")
    train.add_argument("--bf16", action="store_true", default=None,
                       help="bfloat16 autocast (slower on CPUs without bfloat16 instructions)")
    train.add_argument("--seed", type=int, help="seed of initialisation, batches and split (default 0)")
    train.add_argument("--eval-every", type=_positive, help="steps between validations (default 50)")
    train.add_argument("--save-every", type=int, help="steps between checkpoints, 0 = only at the end (default 100)")
    train.add_argument("--keep-checkpoints", type=int, help="checkpoints kept, 0 = all (default 2)")
    train.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default auto: cuda if available")
    train.add_argument("--nproc", type=_positive, help="processes on this machine (default 1); more than one "
                       "re-launches the command through torchrun and trains with expert parallelism over them")
    train.add_argument("--ep", type=_positive, help="expert-parallel ranks: a divisor of the processes, the rest is "
                       "data parallel (default: all the processes, --nproc or torchrun's)")
    train.add_argument("--dist-timeout", type=float, help="seconds a collective waits for the other ranks before "
                       "the run fails (a dead or stuck rank; default 300)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    train.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    train.add_argument("--json", action="store_true", help="print only the result, as JSON")
    train.set_defaults(func=_train, train_parser=train)


def _add_generate(sub) -> None:
    gen = sub.add_parser("generate", help="continue a prompt with a trained checkpoint, streaming the text")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a run directory (its latest checkpoint) or checkpoint dir")
    source.add_argument("--hf", help="a Hugging Face model folder (config.json, safetensors, tokenizer.json)")
    gen.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="--hf: weight dtype (default: "
                     "the checkpoint's)")
    gen.add_argument("--max-seq-len", type=_positive, help="--hf: cap the context (default: the model's)")
    gen.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    gen.add_argument("--max-new-tokens", type=_positive, default=100)
    gen.add_argument("--temperature", type=float, default=0.8)
    gen.add_argument("--top-k", type=_positive)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--greedy", action="store_true", help="always take the most likely token")
    gen.add_argument("--seed", type=int, help="seed of the sampling (reproducible output)")
    gen.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu")
    gen.set_defaults(func=_generate)


def _add_compare(sub) -> None:
    cmp = sub.add_parser(
        "compare", help="train a dense and an MoE model with equal active parameters on the same data (~4 min)",
        description="Validation loss vs training FLOPs of both, as a plot and a table. "
        "Defaults: moekit.train.CompareConfig.",
    )
    cmp.add_argument("--moe", help="MoE preset (default tiny-mixtral)")
    cmp.add_argument("--dense", help="dense preset (default tiny-dense)")
    cmp.add_argument("--tokens", type=_positive, help="training tokens per model (default 655360)")
    cmp.add_argument("--out", help="output directory (default runs/compare)")
    _add_data_options(cmp)
    cmp.add_argument("--batch-size", type=_positive, help="windows per step (default 16)")
    cmp.add_argument("--seq-len", type=_positive, help="tokens per window (default 64)")
    cmp.add_argument("--eval-every", type=_positive, help="steps between validations (default 40)")
    cmp.add_argument("--seed", type=int)
    cmp.add_argument("--bf16", action="store_true", default=None)
    cmp.add_argument("--device", choices=("auto", "cpu", "cuda"))
    cmp.add_argument("--json", action="store_true", help="print only the result, as JSON")
    cmp.set_defaults(func=_compare)


def _add_train_vision(sub) -> None:
    from moekit.presets import VISION_PRESETS

    vis = sub.add_parser(
        "train-vision", help="train a vision MoE (V-MoE) or a ViT on drawn shapes, no download (~2 min)",
        description="Images from moekit.train.shapes (10 classes of shapes); see moekit.train.vision.VisionTrainConfig "
        "for every default.",
    )
    which = vis.add_mutually_exclusive_group()
    which.add_argument("--preset", default="tiny-vmoe", choices=sorted(VISION_PRESETS), help="default tiny-vmoe")
    which.add_argument("--compare", action="store_true", help="train tiny-vit and tiny-vmoe (equal active parameters) "
                       "with the same images, batches and schedule, and print both")
    vis.add_argument("--out", help="run directory: model.safetensors, config.json, metrics.jsonl (with --compare, "
                     "one subdirectory per preset); default: nothing saved")
    vis.add_argument("--steps", type=_positive, help="optimizer steps (default 300)")
    vis.add_argument("--batch-size", type=_positive, help="images per step (default 64)")
    vis.add_argument("--lr", type=float, help="peak learning rate (default 1e-3)")
    vis.add_argument("--eval-every", type=_positive, help="steps between validations (default 100)")
    vis.add_argument("--train-images", type=_positive, help="training images drawn (default 10000)")
    vis.add_argument("--seed", type=int, help="seed of initialisation, images and batches (default 0)")
    vis.add_argument("--json", action="store_true", help="print only the results, as JSON")
    vis.set_defaults(func=_train_vision)


def _add_analyze(sub) -> None:
    ana = sub.add_parser(
        "analyze", help="routing analysis of a trained MoE model: load, entropy, co-activation, specialisation",
        description="Runs the model over text and writes analysis.json, PNG figures and a self-contained "
        "report.html to --out. See moekit.analysis.report.",
    )
    model = ana.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="a moekit run directory (its latest checkpoint) or checkpoint dir")
    model.add_argument("--hf", help="a Hugging Face model folder (config, safetensors, tokenizer.json)")
    ana.add_argument("--data", help="a text file, folder or .jsonl (default: the embedded corpus' validation split, "
                     "tagged prose/code)")
    ana.add_argument("--text-field", help="JSONL field holding the text (default 'text')")
    ana.add_argument("--out", required=True, help="output directory")
    ana.add_argument("--max-tokens", type=_positive, default=65536, help="tokens analysed at most (default 65536)")
    ana.add_argument("--seq-len", type=_positive, default=128, help="tokens per window (default 128)")
    ana.add_argument("--batch-size", type=_positive, default=16, help="windows per forward (default 16)")
    ana.add_argument("--shuffles", type=_positive, default=5, help="shuffled-label baselines (default 5)")
    ana.add_argument("--dtype", choices=("float32", "bfloat16"), help="weights' dtype for --hf")
    ana.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu")
    ana.add_argument("--seed", type=int, default=0, help="seed of the shuffles")
    ana.add_argument("--json", action="store_true", help="print only the output paths and warnings, as JSON")
    ana.set_defaults(func=_analyze)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from moekit.runtime import tune_cpu_allocator

    tune_cpu_allocator()  # the command owns its process: keep large freed buffers for reuse (see moekit.runtime)
    try:
        return args.func(args)
    except ValueError as err:  # configuration, data and checkpoint errors are the user's to fix: no traceback
        print(f"moekit: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # e.g. an output directory that cannot be written
        print(f"moekit: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("moekit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
