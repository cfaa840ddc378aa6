"""Do experts specialise by domain or by token? tiny-mixtral trained on the embedded corpus (Python docs = prose,
standard-library sources = code), its routing measured on the validation split before and during training.

The literature disagrees: MoE papers often describe "domain experts", while the Mixtral paper (Jiang et al. 2024,
§5, "Routing analysis") found no obvious assignment of experts by topic (ArXiv, biology, philosophy, ... routed
alike) and instead a syntactic one: the same token (`self` in Python, indentation) goes to the same expert, and
consecutive tokens share experts more often than chance. This script measures both on one small model:

* I(domain; expert) against shuffled domain labels, and I(domain; expert | token id): what the domain says about the
  expert beyond the tokens it uses (code and prose use different tokens, so the plain MI mixes the two);
* I(token id; expert) against shuffled token ids, and "consistency": the share of tokens whose first choice is the
  most frequent first choice of their token id, against the same with ids shuffled;
* the share of consecutive tokens with the same first expert / overlapping expert pairs, against uniform routing
  (Mixtral's Table 5 measure);
* all of it for the untrained model too: at initialisation a router already sees mostly the token embedding, so
  token "specialisation" there is an artefact of the architecture, not something learned.

    python examples/specialisation.py                 # about 5-10 minutes on 2 CPU cores
    python examples/specialisation.py --steps 40      # a quick look

Writes docs/specialisation.png and docs/specialisation.json, the full routing report of the trained model to
<out>/analysis/report.html, and prints the numbers as a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from moekit.analysis.plots import _pyplot
from moekit.analysis.report import write_report
from moekit.analysis.routing import analyze_routing
from moekit.train import checkpoint as ckpt
from moekit.train.trainer import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[1]


def analyse(model, data, shuffles: int):
    """The routing of `model` over the whole validation split (its tokens, with their prose/code tags)."""
    val = data.val
    return analyze_routing(
        model, val.ids, val.domains.long(), val.domain_names, seq_len=128, batch_size=16, shuffles=shuffles,
        decode=lambda v: data.tokenizer.decode([v]), progress=False,
    )


def summary(analysis, step: int) -> list[dict]:
    rows = []
    for layer in analysis.layers:
        rows.append({
            "step": step,
            "layer": layer.layer,
            "imbalance": layer.imbalance,
            "entropy_normalised": layer.entropy_normalised,
            "H_expert_bits": layer.expert_entropy_bits,
            "domain_mi": layer.domain_mi.value,
            "domain_mi_shuffled_mean": layer.domain_mi.baseline_mean,
            "domain_mi_shuffled_std": layer.domain_mi.baseline_std,
            "domain_mi_excess": layer.domain_mi.excess,
            "domain_mi_given_token": layer.domain_mi_given_token.value,
            "domain_mi_given_token_shuffled_mean": layer.domain_mi_given_token.baseline_mean,
            "domain_mi_given_token_shuffled_std": layer.domain_mi_given_token.baseline_std,
            "domain_mi_given_token_excess": layer.domain_mi_given_token.excess,
            "token_mi": layer.token_mi.value,
            "token_mi_shuffled_mean": layer.token_mi.baseline_mean,
            "token_mi_shuffled_std": layer.token_mi.baseline_std,
            "token_mi_excess": layer.token_mi.excess,
            "domain_fraction": layer.domain_mi_fraction,
            "token_fraction": layer.token_mi_fraction,
            "token_consistency": layer.token_consistency.value,
            "token_consistency_shuffled": layer.token_consistency.baseline_mean,
            "domain_consistency": layer.domain_consistency.value,
            "domain_consistency_shuffled": layer.domain_consistency.baseline_mean,
            "repeat_first": layer.repeat_first,
            "repeat_any": layer.repeat_any,
            "repeat_first_chance": layer.repeat_first_chance,
            "repeat_first_shuffled": layer.repeat_first_shuffled,
            "repeat_any_shuffled": layer.repeat_any_shuffled,
            "repeat_any_chance": layer.repeat_any_chance,
            "max_code_share": max(row[layer_domain_index(analysis, "code")] for row in layer.domain_shares),
            "min_code_share": min(row[layer_domain_index(analysis, "code")] for row in layer.domain_shares),
        })
    return rows


def layer_domain_index(analysis, name: str) -> int:
    return analysis.domain_names.index(name)


def plot(rows: list[dict], corpus_code_share: float, path: Path) -> None:
    plt = _pyplot()
    steps = sorted({r["step"] for r in rows})
    layers = sorted({r["layer"] for r in rows})
    first, last = steps[0], steps[-1]
    by = {(r["step"], r["layer"]): r for r in rows}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))

    ax = axes[0]
    width = 0.2
    for j, (key, label, color) in enumerate((
        ("domain_mi_excess", "I(domain; expert)", "tab:blue"),
        ("domain_mi_given_token_excess", "I(domain; expert | token)", "tab:cyan"),
        ("token_mi_excess", "I(token; expert)", "tab:orange"),
    )):
        xs = [x + (j - 1) * width for x in range(len(layers))]
        ax.bar(xs, [by[(last, layer)][key] for layer in layers], width, color=color, label=f"{label}, trained")
        ax.scatter(xs, [by[(first, layer)][key] for layer in layers], color="black", marker="_", s=150, zorder=3,
                   label="untrained (step 0)" if j == 0 else None)
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels([f"layer {layer}" for layer in layers])
    ax.set_ylabel("bits above the shuffled-label baseline")
    ax.set_title("what the label tells about the expert choice", fontsize=10)
    ax.legend(fontsize=7)

    ax = axes[1]
    for layer in layers:
        ax.plot(steps, [by[(s, layer)]["token_consistency"] - by[(s, layer)]["token_consistency_shuffled"]
                        for s in steps], "o-", label=f"layer {layer}: by token id")
    for layer in layers:
        ax.plot(steps, [by[(s, layer)]["domain_consistency"] - by[(s, layer)]["domain_consistency_shuffled"]
                        for s in steps], "x--", color="gray", alpha=0.7, label="by domain" if layer == layers[0] else None)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xlabel("training step")
    ax.set_ylabel("consistency - consistency with labels shuffled")
    ax.set_title("first choice predicted by the token id / domain (above chance)", fontsize=10)
    ax.legend(fontsize=7)

    ax = axes[2]
    xs = range(len(layers))
    ax.bar([x - 0.2 for x in xs], [by[(last, layer)]["repeat_first"] for layer in layers], 0.4,
           label="same first choice")
    ax.bar([x + 0.2 for x in xs], [by[(last, layer)]["repeat_any"] for layer in layers], 0.4,
           label="first or second choice shared")
    ax.scatter([x - 0.2 for x in xs], [by[(last, layer)]["repeat_first_shuffled"] for layer in layers], color="black",
               marker="_", s=300, zorder=3, label="token order shuffled")
    ax.scatter([x + 0.2 for x in xs], [by[(last, layer)]["repeat_any_shuffled"] for layer in layers], color="black",
               marker="_", s=300, zorder=3)
    r0 = by[(last, layers[0])]
    ax.axhline(r0["repeat_first_chance"], color="tab:blue", ls=":", lw=1, label="uniform routing")
    ax.axhline(r0["repeat_any_chance"], color="tab:orange", ls=":", lw=1)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([f"layer {layer}" for layer in layers])
    ax.set_ylim(0, 1)
    ax.set_title(f"consecutive tokens routed alike (trained, step {last})", fontsize=10)
    ax.legend(fontsize=7)
    fig.suptitle(f"tiny-mixtral on the embedded corpus (validation split, code {corpus_code_share:.0%} of tokens)")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def markdown(rows: list[dict]) -> str:
    lines = [
        "| step | layer | max/mean | I(dom;E) bits (shuffled) | I(dom;E\\|tok) excess | I(tok;E) bits (shuffled) "
        "| token share of H(E) | domain share of H(E) | token consistency (shuffled) | domain consistency (shuffled) "
        "| repeat first / any (order shuffled) |",
        "|---:|---:|---:|---|---:|---|---:|---:|---|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['step']} | {r['layer']} | {r['imbalance']:.2f} | {r['domain_mi']:.4f} "
            f"({r['domain_mi_shuffled_mean']:.4f} ± {r['domain_mi_shuffled_std']:.4f}) "
            f"| {r['domain_mi_given_token_excess']:.4f} "
            f"| {r['token_mi']:.3f} ({r['token_mi_shuffled_mean']:.3f} ± {r['token_mi_shuffled_std']:.3f}) "
            f"| {r['token_fraction']:.1%} | {r['domain_fraction']:.1%} "
            f"| {r['token_consistency']:.3f} ({r['token_consistency_shuffled']:.3f}) "
            f"| {r['domain_consistency']:.3f} ({r['domain_consistency_shuffled']:.3f}) "
            f"| {r['repeat_first']:.3f} / {r['repeat_any']:.3f} "
            f"({r['repeat_first_shuffled']:.3f} / {r['repeat_any_shuffled']:.3f}) |"
        )
    return "\n".join(lines)


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _reuse(config: TrainConfig):
    """The untrained model, data and training result of a finished run, rebuilt without training: the same seed
    gives the same initial weights as the Trainer's (it seeds torch right before building the model)."""
    from moekit.models.lm import MoELM
    from moekit.train.data import Tokenizer, prepare_data
    from moekit.train.trainer import build_model_config

    found = ckpt.resolve_checkpoint(config.out)
    data = prepare_data(config.data, Tokenizer.load(found / ckpt.TOKENIZER_FILE), config.vocab_size, seed=config.seed)
    torch.manual_seed(config.seed)
    model = MoELM(build_model_config(config.preset, data.tokenizer.vocab_size, config.seq_len))
    saved = Path(config.out) / "result.json"
    if saved.is_file():
        result = json.loads(saved.read_text())
    else:
        from moekit.train.trainer import load_metrics

        last = load_metrics(config.out)[-1]
        val = [r["val_loss"] for r in load_metrics(config.out) if r.get("val_loss") is not None]
        result = {"steps": last["step"], "tokens": last["tokens"], "val_loss": val[-1] if val else float("nan"),
                  "seconds": float("nan")}
    return model, data, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps (default 300: 614,400 tokens)")
    parser.add_argument("--snapshots", type=int, default=3, help="checkpoints analysed during training (default 3)")
    parser.add_argument("--out", default="runs/specialisation", help="run directory")
    parser.add_argument("--docs", default=str(ROOT / "docs"), help="where the figure and numbers go")
    parser.add_argument("--shuffles", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core machine)")
    parser.add_argument("--reuse", action="store_true", help="analyse the checkpoints already in --out (no training)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    every = max(1, args.steps // args.snapshots)
    config = TrainConfig(preset="tiny-mixtral", out=args.out, steps=args.steps, save_every=every, keep_checkpoints=0,
                         eval_every=every, device="cpu")
    if args.reuse:
        model, data, result = _reuse(config)
    else:
        trainer = Trainer(config, overwrite=True, log=print, progress=False)
        model, data = trainer.model, trainer.data
    rows = summary(analyse(model, data, args.shuffles), 0)  # the untrained model: the control
    print(f"step 0 analysed ({time.perf_counter() - start:.0f} s)")
    if not args.reuse:
        result = trainer.train()
        result = {"steps": result.steps, "tokens": result.tokens, "val_loss": result.val_loss, "seconds": result.seconds}
        _write_json(Path(args.out) / "result.json", result)
    print(f"trained {result['steps']} steps in {result['seconds']:.0f} s; val_loss {result['val_loss']:.3f}")

    final = None
    for checkpoint in sorted((Path(args.out) / ckpt.CHECKPOINTS).glob("step_*")):
        model, _, _ = ckpt.load_model(checkpoint)
        step = int(checkpoint.name.split("_")[1])
        final = analyse(model, data, args.shuffles)
        rows += summary(final, step)
        print(f"step {step} analysed ({time.perf_counter() - start:.0f} s)")
    final.source = {"model": f"tiny-mixtral, {result['steps']} steps", "text": "the embedded corpus' validation split"}
    files = write_report(final, Path(args.out) / "analysis")

    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    domain_tokens = final.domain_tokens
    code_share = domain_tokens[final.domain_names.index("code")] / sum(domain_tokens)
    plot(rows, code_share, docs / "specialisation.png")
    record = {
        "config": {"preset": "tiny-mixtral", "steps": result["steps"], "tokens": result["tokens"],
                   "val_loss": result["val_loss"], "train_seconds": round(result["seconds"]) if result["seconds"] == result["seconds"] else None,
                   "validation_tokens": final.num_tokens, "domain_tokens": dict(zip(final.domain_names, domain_tokens)),
                   "shuffles": args.shuffles, "python": sys.version.split()[0]},
        "rows": rows,
        "top_tokens_trained": {
            f"layer {layer.layer}": {
                f"expert {e}": [(t.text, round(t.lift, 2), t.count) for t in tokens[:8]]
                for e, tokens in enumerate(layer.top_tokens)
            }
            for layer in final.layers
        },
    }
    _write_json(docs / "specialisation.json", record)
    print(markdown(rows))
    print(f"\nfigure {docs / 'specialisation.png'}, numbers {docs / 'specialisation.json'}, report {files.html}")
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
