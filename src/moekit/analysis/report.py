"""The routing report: from a model (a checkpoint, a Hugging Face folder, or any `MoELM`) and text to a directory of
`analysis.json` (every number, including the data behind each figure), PNG figures and one self-contained
`report.html` (figures embedded as base64 data URIs: it can be mailed or opened offline).

    moekit analyze --checkpoint runs/tiny-mixtral --out runs/tiny-mixtral/analysis

`analyze_routing_report` is what the command runs; `write_report` turns an existing `RoutingAnalysis` into the
files, and `format_summary` into the text the command prints.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moekit.analysis import plots
from moekit.analysis.routing import RoutingAnalysis, analyze_routing

ANALYSIS_JSON = "analysis.json"
REPORT_HTML = "report.html"
DEFAULT_MAX_TOKENS = 65_536  # the whole validation split of the embedded corpus with its BPE (45k tokens)


# ---------------------------------------------------------------------------------------------------- inputs


class _PlainTokenizer:
    """A Hugging Face `tokenizers` tokenizer without moekit's EOS requirement (for `--hf` folders)."""

    def __init__(self, hf) -> None:
        self.hf = hf
        self.eos_id = None

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)


def load_hf_model(path: str | os.PathLike, device: str = "cpu", dtype: torch.dtype | str | None = None):
    """A Hugging Face model folder as (MoELM, tokenizer), through `moekit.hf.load_pretrained`.

    dtype: the weights' dtype ("float32", "bfloat16" or a torch.dtype); None leaves the loader's default.

    Raises:
        ValueError: the folder has no tokenizer.json (or is not a loadable checkpoint: `HFCheckpointError`).
    """
    from moekit.hf import load_pretrained

    folder = Path(path)
    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise ValueError(f"{str(folder)!r} has no tokenizer.json: the analysis needs the model's tokenizer")
    if isinstance(dtype, str):
        name, dtype = dtype, {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(dtype)
        if dtype is None:
            raise ValueError(f"unknown dtype {name!r}: expected 'float32' or 'bfloat16'")
    model = load_pretrained(str(folder), dtype=dtype) if dtype is not None else load_pretrained(str(folder))
    from tokenizers import Tokenizer as HFTokenizer

    return model.to(_device(device)).eval(), _PlainTokenizer(HFTokenizer.from_file(str(tokenizer_file)))


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def text_tokens(
    tokenizer,
    data: str | os.PathLike | None = None,
    text_field: str = "text",
    max_tokens: int = DEFAULT_MAX_TOKENS,
    seq_len: int = 128,
    split_seed: int = 0,
) -> tuple[Tensor, Tensor, list[str], str]:
    """The tokens to analyse, with the domain of each.

    Args:
        tokenizer: encodes text (`encode_batch`); its `eos_id` (if not None) ends every document.
        data: a file, folder or JSONL (every document of it, domains as in `moekit.train.data.load_documents`),
            or None for the embedded corpus' validation split (the documents a run on it did not train on).
        text_field: JSONL key of the text.
        max_tokens: at most this many tokens; a longer stream is sampled as windows of seq_len spread evenly over
            it, so every part (every domain) of the text is represented.
        seq_len: the window length of that sampling.
        split_seed: the seed of the train/validation split (the training run's `seed`).
    Returns:
        (ids [N] int64, domains [N] int64, domain names, a description of the text).
    """
    from moekit.train.data import load_documents, split_documents

    if max_tokens < 2:
        raise ValueError(f"max_tokens must be >= 2, got {max_tokens}")
    docs = load_documents(data, text_field)
    names = sorted({d.domain for d in docs})
    if data is None:
        docs = split_documents(docs, seed=split_seed)[1]
        what = "the embedded corpus' validation split"
    else:
        what = str(data)
    ids: list[int] = []
    domains: list[int] = []
    for doc, doc_ids in zip(docs, tokenizer.encode_batch([d.text for d in docs])):
        extra = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
        ids.extend(doc_ids + extra)
        domains.extend([names.index(doc.domain)] * (len(doc_ids) + len(extra)))
    ids_N = torch.tensor(ids, dtype=torch.int64)
    domains_N = torch.tensor(domains, dtype=torch.int64)
    if ids_N.numel() < 2:
        raise ValueError(f"{what} gives {ids_N.numel()} tokens: at least 2 are needed")
    if ids_N.numel() > max_tokens:
        seq_len = min(seq_len, max_tokens)
        count = max_tokens // seq_len
        starts = torch.arange(count) * (ids_N.numel() - seq_len) // max(count - 1, 1)
        index = (starts[:, None] + torch.arange(seq_len)).reshape(-1)
        ids_N, domains_N = ids_N[index], domains_N[index]
        what += f" ({count} windows of {seq_len} tokens spread over it)"
    return ids_N, domains_N, names, what


# ---------------------------------------------------------------------------------------------------- writing


def _write_atomic(path: Path, data: str | bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _json_safe(value: Any) -> Any:
    """NaN/inf become None: JSON has no spelling for them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


@dataclass
class ReportFiles:
    """What `write_report` wrote. Attributes: out_dir, json (analysis.json), html (report.html), figures
    ({name: png})."""

    out_dir: Path
    json: Path
    html: Path
    figures: dict[str, Path]


def write_report(analysis: RoutingAnalysis | dict[str, Any], out_dir: str | os.PathLike) -> ReportFiles:
    """Write analysis.json, the PNG figures and report.html into out_dir (created if missing), each atomically.

    Args:
        analysis: a RoutingAnalysis, or its `to_dict()` (e.g. analysis.json read back).
        out_dir: the output directory.
    Returns:
        ReportFiles.
    """
    data = _json_safe(analysis.to_dict() if isinstance(analysis, RoutingAnalysis) else analysis)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / ANALYSIS_JSON
    _write_atomic(json_path, json.dumps(data, indent=1) + "\n")
    figures = plots.plot_all(data, out)
    html_path = out / REPORT_HTML
    _write_atomic(html_path, render_html(data, figures))
    return ReportFiles(out, json_path, html_path, figures)


# ------------------------------------------------------------------------------------------------------ HTML


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1150px; color: #222; line-height: 1.45; }
h1 { margin-bottom: 0.2em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f2f2f2; }
td.text { text-align: left; font-family: ui-monospace, monospace; white-space: pre; }
img { max-width: 100%; border: 1px solid #eee; }
.warning { background: #fff3cd; border: 1px solid #e0a800; padding: 0.8em 1em; margin: 1em 0; }
.ok { background: #e8f5e9; border: 1px solid #66bb6a; padding: 0.8em 1em; margin: 1em 0; }
.note { color: #555; font-size: 0.92em; }
"""

# Sets data-images-loaded="loaded/total" on <html> once the page has loaded (the browser test reads it).
_IMAGE_CHECK = """
window.addEventListener("load", function () {
  var images = document.images, loaded = 0;
  for (var i = 0; i < images.length; i++) {
    if (images[i].complete && images[i].naturalWidth > 0) { loaded++; }
  }
  document.documentElement.setAttribute("data-images-loaded", loaded + "/" + images.length);
});
"""

_CAPTIONS = {
    "load": "Share of tokens routed to each expert, per layer (a balanced top-K router gives K/E everywhere).",
    "entropy": "Mean entropy of each token's routing distribution; ln E is a uniform router, 0 a one-hot one.",
    "coactivation": "Share of tokens whose chosen experts include both i and j; 'chance' is uniform routing.",
    "domains": "Left: share of each expert's tokens from one domain (a domain-blind router matches the corpus "
    "share). Right: I(domain; expert) against the same with the domain labels shuffled across tokens.",
    "specialisation": "Left: share of the expert choice's entropy explained by the domain and by the token id "
    "(MI in excess of its shuffled baseline, over H(expert)). Right: share of tokens whose first choice is the most "
    "frequent first choice of their token id (or domain); black marks: the same with the labels shuffled.",
}

_TITLES = {
    "load": "Load per expert",
    "entropy": "Router entropy",
    "coactivation": "Expert co-activation",
    "domains": "Domain specialisation",
    "specialisation": "Token vs domain",
}


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else "n/a"
    return f"{value:,}" if isinstance(value, int) else html.escape(str(value))


def _baseline_cell(b: dict[str, Any] | None, digits: int = 3) -> str:
    if b is None:
        return "n/a"
    return (f"{_fmt(b['value'], digits)} (shuffled {_fmt(b['baseline_mean'], digits)} ± "
            f"{_fmt(b['baseline_std'], digits)}; excess {_fmt(b['excess'], digits)})")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], text_cols: Sequence[int] = ()) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td class="text">{c}</td>' if j in text_cols else f"<td>{c}</td>" for j, c in enumerate(r))
        + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _token_text(text: str) -> str:
    return html.escape(json.dumps(text, ensure_ascii=False)[1:-1].replace(" ", "\u2423"))


def render_html(data: dict[str, Any], figures: dict[str, Path]) -> str:
    """The self-contained HTML of a report: headings, the collapse warning, tables and the figures inlined."""
    layers = data["layers"]
    source = data.get("source") or {}
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>moekit routing analysis</title>',
        f"<style>{_CSS}</style><script>{_IMAGE_CHECK}</script></head><body>",
        "<h1>Routing analysis</h1>",
        '<p class="note">' + html.escape(
            "; ".join(f"{k}: {v}" for k, v in source.items()) + ("; " if source else "")
            + f"{data['num_tokens']:,} tokens in windows of {data['seq_len']}"
            + ("; domains " + ", ".join(f"{n} {c:,}" for n, c in zip(data["domain_names"], data["domain_tokens"]))
               if data["domain_names"] else "")
        ) + "</p>",
    ]
    thresholds = data["thresholds"]
    rule = (f"an expert chosen by more than {thresholds['collapse_token_share']:.0%} of tokens at "
            f"{thresholds['collapse_max_over_mean']:g}x the mean load or more")
    if data["warnings"]:
        items = "".join(f"<li>{html.escape(w)}</li>" for w in data["warnings"])
        parts.append(f'<div class="warning" id="collapse-warning"><strong>Router collapse warning</strong> '
                     f"({html.escape(rule)}):<ul>{items}</ul></div>")
    else:
        parts.append(f'<div class="ok">No router collapse (threshold: {html.escape(rule)}).</div>')

    parts.append("<h2>Summary</h2>")
    rows = [
        [
            str(layer["layer"]), _fmt(layer["imbalance"], 2), _fmt(layer["cv"], 3),
            f"{_fmt(layer['entropy'], 3)} ({_fmt(layer['entropy_normalised'], 2)} of ln E)",
            _fmt(layer["dropped"]), _fmt(layer["rerouted"]),
            _baseline_cell(layer["domain_mi"], 4), _baseline_cell(layer.get("domain_mi_given_token"), 4),
            _baseline_cell(layer["token_mi"], 3),
            _baseline_cell(layer["token_consistency"], 3),
            f"{_fmt(layer['repeat_first'], 3)} / {_fmt(layer['repeat_any'], 3)} "
            f"(order shuffled {_fmt(layer.get('repeat_first_shuffled'), 3)} / "
            f"{_fmt(layer.get('repeat_any_shuffled'), 3)}; uniform {_fmt(layer['repeat_first_chance'], 3)} / "
            f"{_fmt(layer['repeat_any_chance'], 3)})",
        ]
        for layer in layers
    ]
    parts.append(_table(
        ["layer", "max/mean", "CV", "entropy (nats)", "dropped", "re-routed", "I(domain; expert) bits",
         "I(domain; expert | token) bits", "I(token; expert) bits", "token consistency", "consecutive repeats first / any"],
        rows,
    ))
    parts.append('<p class="note">Mutual information is over slots (a top-2 token counts once per expert); the '
                 "shuffled baseline permutes the labels across tokens (for the conditional MI: within each token id), so "
                 "it measures the estimator's bias at this sample size: the excess is the evidence. "
                 "I(domain; expert | token) is what the domain tells about the expert beyond the tokens it uses.</p>")

    for name in plots.FIGURES:
        path = figures.get(name)
        if path is None:
            continue
        encoded = base64.b64encode(Path(path).read_bytes()).decode("ascii")
        parts.append(f'<h2 id="{name}">{_TITLES[name]}</h2>')
        parts.append(f'<img alt="{html.escape(_TITLES[name])}" src="data:image/png;base64,{encoded}">')
        parts.append(f'<p class="note">{html.escape(_CAPTIONS[name])}</p>')
        if name == "load":
            E = max(layer["num_experts"] for layer in layers)
            parts.append(_table(
                ["layer"] + [f"expert {e}" for e in range(E)],
                [[str(layer["layer"])] + [_fmt(v) for v in layer["tokens_per_expert"]] for layer in layers],
            ))
        if name == "domains" and data["domain_names"] and layers[0]["domain_shares"] is not None:
            names = data["domain_names"]
            parts.append(_table(
                ["layer", "expert"] + [f"share {n}" for n in names],
                [[str(layer["layer"]), str(e)] + [_fmt(v, 3) for v in row]
                 for layer in layers for e, row in enumerate(layer["domain_shares"])],
            ))

    parts.append("<h2>Preferred tokens</h2>")
    parts.append('<p class="note">Per expert, the tokens it takes most often relative to their frequency in the text '
                 "(lift = P(token | expert) / P(token)); count = tokens of that id routed to the expert.</p>")
    for layer in layers:
        parts.append(f"<h3>Layer {layer['layer']}</h3>")
        rows = [
            [str(e), " ".join(_token_text(t["text"]) for t in tokens[:10]) or "(none)",
             " ".join(f"{t['lift']:.1f}" for t in tokens[:10])]
            for e, tokens in enumerate(layer["top_tokens"])
        ]
        parts.append(_table(["expert", "tokens (by lift)", "lift"], rows, text_cols=(1, 2)))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def format_summary(analysis: RoutingAnalysis | dict[str, Any]) -> str:
    """The per-layer numbers as a text table, with the collapse warnings, for the terminal."""
    data = analysis.to_dict() if isinstance(analysis, RoutingAnalysis) else analysis
    lines = [
        f"{'layer':>5} {'max/mean':>8} {'cv':>6} {'entropy':>8} {'dropped':>8} {'domain MI (shuffled)':>24} "
        f"{'token MI (shuffled)':>22} {'token cons.':>11}"
    ]
    for layer in data["layers"]:
        dmi = layer["domain_mi"]
        dmi_text = "n/a" if dmi is None else f"{dmi['value']:.4f} ({dmi['baseline_mean']:.4f}±{dmi['baseline_std']:.4f})"
        tmi = layer["token_mi"]
        cons = layer["token_consistency"]
        tmi_text = f"{tmi['value']:.3f} ({tmi['baseline_mean']:.3f}±{tmi['baseline_std']:.3f})"
        cons_text = "n/a" if cons is None else f"{cons['value']:.3f}"
        lines.append(
            f"{layer['layer']:>5} {layer['imbalance']:>8.2f} {layer['cv']:>6.3f} {layer['entropy']:>8.3f} "
            f"{layer['dropped']:>8,} {dmi_text:>24} {tmi_text:>22} {cons_text:>11}"
        )
    t = data["thresholds"]
    if data["warnings"]:
        lines += [f"WARNING: {w}" for w in data["warnings"]]
    else:
        lines.append(
            f"no router collapse (warning threshold: an expert chosen by > {t['collapse_token_share']:.0%} of tokens "
            f"at >= {t['collapse_max_over_mean']:g}x the mean load)"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- end to end


def analyze_routing_report(
    out_dir: str | os.PathLike,
    checkpoint: str | os.PathLike | None = None,
    hf: str | os.PathLike | None = None,
    model: nn.Module | None = None,
    tokenizer=None,
    data: str | os.PathLike | None = None,
    text_field: str = "text",
    max_tokens: int = DEFAULT_MAX_TOKENS,
    seq_len: int = 128,
    batch_size: int = 16,
    shuffles: int = 5,
    device: str = "cpu",
    dtype: torch.dtype | str | None = None,
    seed: int = 0,
    progress: bool | None = None,
    log: Callable[[str], None] = print,
) -> tuple[RoutingAnalysis, ReportFiles]:
    """Load a model, run it over text, and write the report: what `moekit analyze` does.

    Give exactly one of `checkpoint` (a moekit run or checkpoint directory), `hf` (a Hugging Face folder, through
    `moekit.hf.load_pretrained`) or `model` + `tokenizer` (any MoELM already in memory).

    Args:
        out_dir: where analysis.json, the PNGs and report.html go.
        data: text to analyse (see `text_tokens`); None = the embedded corpus' validation split.
        max_tokens, seq_len, batch_size, shuffles, seed: see `text_tokens` and `analyze_routing`.
        device: "cpu", "cuda" or "auto". dtype: the weights' dtype for `hf` (None: the loader's default).
        progress: progress bar over the text (None: on a terminal).
        log: receives a line of text per stage.
    Returns:
        (the RoutingAnalysis, the ReportFiles).
    """
    if sum(x is not None for x in (checkpoint, hf, model)) != 1:
        raise ValueError("give exactly one of a checkpoint, a Hugging Face folder (hf) or a model")
    split_seed = 0
    if checkpoint is not None:
        from moekit.train.checkpoint import load_model, load_state

        model, tokenizer, found = load_model(checkpoint, device)
        split_seed = int(load_state(found)[0].get("train_config", {}).get("seed", 0))
        source = {"model": str(found)}
    elif hf is not None:
        model, tokenizer = load_hf_model(hf, device, dtype)
        source = {"model": str(hf)}
    else:
        if tokenizer is None:
            raise ValueError("a model given in memory needs its tokenizer")
        source = {"model": type(model).__name__}
    max_len = getattr(getattr(model, "config", None), "max_seq_len", seq_len)
    seq_len = min(seq_len, max_len)
    ids_N, domains_N, names, what = text_tokens(tokenizer, data, text_field, max_tokens, seq_len, split_seed)
    source["text"] = what
    log(f"analysing {ids_N.numel():,} tokens of {what}")
    analysis = analyze_routing(
        model, ids_N, domains_N, names, seq_len=seq_len, batch_size=batch_size, shuffles=shuffles,
        decode=lambda v: tokenizer.decode([v]), seed=seed, progress=progress,
    )
    analysis.source = source
    return analysis, write_report(analysis, out_dir)
