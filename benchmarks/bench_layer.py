"""Benchmark of one MoE layer against a dense FFN of equal active FLOPs and against other MoE implementations.

Legend: T tokens, D model dim, F expert hidden dim, E experts, K experts per token.

Candidates (all Mixtral-style: SwiGLU experts, top-k on the logits then softmax over the k, no bias):
  moekit      `MoE(MoEConfig(..., router="topk", softmax_order="topk_softmax"))`.
  naive       the tutorial double loop (for expert e, for slot j: mask tokens, run expert, scatter-add), written here.
  hf_grouped  transformers' MixtralSparseMoeBlock with `experts_implementation="grouped_mm"`.
  hf_eager    the same block with `experts_implementation="eager"` (a Python loop over the experts hit).
  dense       a SwiGLU FFN of hidden width K*F: the same active FLOPs per token as the MoE, the baseline.
All MoE candidates share moekit's weights (copied into HF's [E, 2F, D] / [E, D, F] layout) and their outputs are
checked against moekit's once per shape before timing, so the comparison is apples to apples.

Methodology:
  - Shapes. Training: T=4096 (x [8, 512, D]), D=512 and constant active FLOPs per token, (E, K, F) in
    (8,2,1024), (32,4,512), (64,8,256), (128,8,256). Decode: T=1 and T=8 (one new token per sequence), E=64, K=8,
    D=1024, F=512.
  - Passes. "fwd" runs under torch.no_grad() (inference); "fwd+bwd" is `out = m(x); out.backward(grad)` with a fixed
    random grad and an input that requires grad, parameter and input grads set to None (untimed) between calls.
    Decode shapes are inference: fwd only, unless --decode-backward.
  - Dtypes. Weights and input both in float32 or bfloat16 (no autocast).
  - Timing. time.perf_counter around one call; torch's default thread count. Candidates are interleaved
    round-robin (the order rotates every round) so that noise from a shared machine hits all of them alike; the
    first rounds are warm-up and discarded. Each reported number is the median over rounds of (candidate time /
    dense time of the same round), beside the dense median in ms. `--stat min` reports best time / dense's best
    time instead, the better estimate of a quiet machine when load comes in bursts; the JSON holds both and every
    sample. The naive loop runs only in the first few rounds (--slow-repeats), and so does HF's eager loop in
    training shapes (indexing `gate_up_proj[e]` makes its backward materialise a full [E, 2F, D] gradient per
    expert hit): both take seconds per fwd+bwd at large E. The load average at start and end is printed: on a
    shared 2-core machine, oversubscribed OpenMP threads stall the candidates made of many small ops (naive, HF
    eager, grouped_mm's per-expert GEMMs on CPU) far more than the dense FFN's few large GEMMs: each small
    parallel region can wait a whole scheduler time slice for a descheduled thread. Trust a table only from a
    quiet machine, or compare with `--threads 1`, which does not suffer from this.
  - Decode. Before every timed decode call (untimed) a 512 MiB buffer is read, about twice the last-level cache,
    to evict the layer's weights as the other layers of a real model would. The weight-read bound is the time
    to stream the bytes the layer must read at the measured read bandwidth (median time of `buf.sum()` over a
    1 GiB buffer): distinct experts the routing touches x 3*D*F*itemsize + the router's E*D*itemsize.

HF's experts implementation: transformers 5.x wraps MixtralExperts with `use_experts_implementation`, whose forward
looks up `self.config._experts_implementation` (set from the `experts_implementation` config kwarg) in
ALL_EXPERTS_FUNCTIONS; "eager" (or None) falls back to the class's own loop. `check_hf_path` verifies this with the
profiler: the grouped_mm block must call aten::_grouped_mm (not transformers' grouped_mm_fallback loop) and the
eager block must not.

Usage: python benchmarks/bench_layer.py [--quick] [--repeats N] [--dtypes float32,bfloat16] [--json out.json]
       [--only moekit,naive,hf_grouped,hf_eager] [--skip-naive] [--stat median|min] [--threads N]
       [--decode-backward] [--kinds train,decode]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit import MoE, MoEConfig
from moekit.layers import kernels

CANDIDATES = ("moekit", "naive", "hf_grouped", "hf_eager")
SLOW = ("naive", "hf_eager")  # seconds per training fwd+bwd at large E: fewer rounds (--slow-repeats)
STATS = ("median", "min")
TRAIN_SHAPES = ((8, 2, 1024), (32, 4, 512), (64, 8, 256), (128, 8, 256))  # (E, K, F): K*F constant
TRAIN_D = 512
DECODE = dict(E=64, K=8, D=1024, F=512)
TARGET_TRAIN = {"float32": 1.2, "bfloat16": 1.4}  # fwd+bwd moekit/dense
TARGET_DECODE_T1 = 1.2  # fwd moekit/dense at T=1
TARGET_DECODE_T8 = 2.0  # fwd moekit/weight-read bound at T=8


class NaiveMoE(nn.Module):
    """The tutorial double loop, on moekit's weights (router.weight [E, D], w_in [E, D, 2F], w_out [E, F, D])."""

    def __init__(self, moe: MoE) -> None:
        super().__init__()
        self.moe = moe  # weights only; its forward is never called from here

    def forward(self, x: Tensor) -> Tensor:
        m = self.moe
        E, K, Fh = m.config.num_experts, m.config.top_k, m.config.d_ff
        x_TD = x.reshape(-1, x.shape[-1])
        logits_TE = x_TD.float() @ m.router.weight.float().t()
        top = logits_TE.topk(K, dim=-1)
        idx_TK, w_TK = top.indices, top.values.softmax(dim=-1).to(x.dtype)
        out_TD = torch.zeros_like(x_TD)
        # unbind, not w_in[e]: like per-expert nn.Linear modules, the backward then stacks E gradients once instead
        # of materialising a full [E, D, 2F] gradient per expert (which is what HF's eager loop pays for).
        w_in_E, w_out_E = m.experts.w_in.unbind(0), m.experts.w_out.unbind(0)
        for e in range(E):
            w_in, w_out = w_in_E[e], w_out_E[e]
            for j in range(K):
                mask = idx_TK[:, j] == e
                if not mask.any():
                    continue
                h = x_TD[mask] @ w_in
                y = (F.silu(h[:, :Fh]) * h[:, Fh:]) @ w_out
                out_TD[mask] += w_TK[mask, j, None] * y
        return out_TD.view_as(x)


class DenseSwiGLU(nn.Module):
    """SwiGLU FFN of hidden width H = K*F (fused gate/up projection): the MoE's active FLOPs per token."""

    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.w_in = nn.Linear(d, 2 * hidden, bias=False)
        self.w_out = nn.Linear(hidden, d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w_in(x).chunk(2, dim=-1)
        return self.w_out(F.silu(gate) * up)


def build_hf(moe: MoE, impls: list[str]) -> dict[str, nn.Module]:
    """MixtralSparseMoeBlocks holding moekit's weights (shared between the blocks), one per experts implementation."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    c = moe.config
    blocks, params = {}, None
    for impl in impls:
        cfg = MixtralConfig(hidden_size=c.d_model, intermediate_size=c.d_ff, num_local_experts=c.num_experts,
                            num_experts_per_tok=c.top_k, experts_implementation=impl)
        block = MixtralSparseMoeBlock(cfg)
        if params is None:
            with torch.no_grad():  # HF layout: gate_up_proj [E, 2F, D] (gate rows first), down_proj [E, D, F]
                block.experts.gate_up_proj.copy_(moe.experts.w_in.transpose(1, 2))
                block.experts.down_proj.copy_(moe.experts.w_out.transpose(1, 2))
                block.gate.weight.copy_(moe.router.weight)
            params = (block.experts.gate_up_proj, block.experts.down_proj, block.gate.weight)
        else:
            block.experts.gate_up_proj, block.experts.down_proj, block.gate.weight = params
        blocks[impl] = block
    return blocks


def check_hf_path(block: nn.Module, x: Tensor, grouped: bool) -> None:
    from torch.profiler import profile

    with torch.no_grad(), profile() as prof:
        block(x)
    ops = {e.key for e in prof.key_averages()}
    uses_grouped = "aten::_grouped_mm" in ops and not any("grouped_mm_fallback" in o for o in ops)
    if uses_grouped != grouped:
        raise RuntimeError(f"HF block with experts_implementation={block.experts.config._experts_implementation!r} "
                           f"{'did not call' if grouped else 'called'} aten::_grouped_mm; ops seen: {sorted(ops)}")


def check_outputs(models: dict[str, nn.Module], x: Tensor, dtype: str) -> None:
    """Every MoE candidate's output equals moekit's. In bfloat16 HF computes the router logits in bf16 (moekit and
    naive in float32), so near-tied tokens may pick other experts: tokens routed alike must agree to bf16
    precision, and at least 90% of the tokens must be routed alike."""
    moe = models["moekit"]
    K, W_ED = moe.config.top_k, moe.router.weight
    with torch.no_grad():
        x_TD = x.reshape(-1, x.shape[-1])
        ref_TD = moe(x).float().reshape(x_TD.shape)
        ref_TK = (x_TD.float() @ W_ED.float().t()).topk(K).indices.sort(-1).values
        for name, m in models.items():
            if name in ("moekit", "dense"):
                continue
            y_TD = m(x).float().reshape(x_TD.shape)
            if dtype == "float32":
                torch.testing.assert_close(y_TD, ref_TD, atol=1e-4, rtol=1e-4, msg=lambda s: f"{name} != moekit: {s}")
                continue
            logits_TE = (x_TD @ W_ED.t()).float() if name.startswith("hf") else x_TD.float() @ W_ED.float().t()
            alike_T = (logits_TE.topk(K).indices.sort(-1).values == ref_TK).all(-1)
            if alike_T.float().mean() < 0.9:
                raise AssertionError(f"{name} routes only {alike_T.float().mean():.1%} of tokens like moekit")
            torch.testing.assert_close(y_TD[alike_T], ref_TD[alike_T], atol=3e-2, rtol=3e-2,
                                       msg=lambda s: f"{name} != moekit (bfloat16, tokens routed alike): {s}")


def read_bandwidth(buf: Tensor, repeats: int = 9) -> float:
    """Bytes/s of a streaming read (`buf.sum()`), median of repeats."""
    buf.sum()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        buf.sum()
        times.append(time.perf_counter() - t0)
    return buf.numel() * buf.element_size() / statistics.median(times)


def time_round_robin(models: dict[str, nn.Module], x: Tensor, grad: Tensor, backward: bool, warmup: int,
                     repeats: int, slow_repeats: int | None, flush: Tensor | None) -> dict[str, list[float]]:
    """Seconds per call of each model, interleaved; warm-up rounds dropped; SLOW candidates capped."""
    names = list(models)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + repeats):
        for i in range(len(names)):
            name = names[(i + r) % len(names)]
            if name in SLOW and slow_repeats is not None and r >= warmup + slow_repeats:
                continue
            m = models[name]
            m.zero_grad(set_to_none=True)
            x.grad = None
            if flush is not None:
                flush.sum()
            t0 = time.perf_counter()
            if backward:
                m(x).backward(grad)
            else:
                with torch.no_grad():
                    m(x)
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[name].append(dt)
    return times


STAT = {"median": statistics.median, "min": min}


def ratios(times: dict[str, list[float]], stat: str) -> dict[str, float]:
    """Each candidate's time over dense's: the median of per-round ratios (a SLOW candidate's rounds are the first
    ones), or the best time over dense's best time (what a quiet machine would show)."""
    dense = times["dense"]
    if stat == "median":
        return {n: statistics.median(t / dense[i] for i, t in enumerate(ts)) for n, ts in times.items()}
    return {n: min(ts) / min(dense) for n, ts in times.items()}


def bench_shape(E: int, K: int, D: int, Fh: int, T: int, dtype: torch.dtype, args, decode: bool,
                flush: Tensor, bandwidth: float) -> list[dict]:
    torch.manual_seed(0)
    moe = MoE(MoEConfig(d_model=D, d_ff=Fh, num_experts=E, top_k=K, activation="swiglu", router="topk",
                        softmax_order="topk_softmax"))
    models: dict[str, nn.Module] = {"moekit": moe}
    if "naive" in args.only:
        models["naive"] = NaiveMoE(moe)
    hf_impls = [impl for name, impl in (("hf_grouped", "grouped_mm"), ("hf_eager", "eager")) if name in args.only]
    for impl, block in build_hf(moe, hf_impls).items():
        models["hf_grouped" if impl == "grouped_mm" else "hf_eager"] = block
    models["dense"] = DenseSwiGLU(D, K * Fh)
    for m in models.values():
        m.to(dtype).train()
    if "moekit" not in args.only:
        del models["moekit"]  # still built: the others borrow its weights

    B = min(T, 8)
    x = torch.randn(B, T // B, D, dtype=dtype, requires_grad=True)
    grad = torch.randn(B, T // B, D, dtype=dtype)
    dname = str(dtype).removeprefix("torch.")
    check_outputs({**models, "moekit": moe}, x, dname)
    for name, grouped in (("hf_grouped", True), ("hf_eager", False)):
        if name in models:
            check_hf_path(models[name], x, grouped)

    with torch.no_grad():
        touched = moe.router(x.reshape(-1, D)).indices.unique().numel()
    itemsize = torch.finfo(dtype).bits // 8
    bound_s = (touched * 3 * D * Fh + E * D) * itemsize / bandwidth

    rows = []
    for backward in (False, True) if args.decode_backward or not decode else (False,):
        warmup, repeats = (args.warmup + 1, args.decode_repeats) if decode else (args.warmup, args.repeats)
        times = time_round_robin(models, x, grad, backward, warmup, repeats, None if decode else args.slow_repeats,
                                 flush if decode else None)
        times = {n: ts for n, ts in times.items() if ts}
        row = dict(kind="decode" if decode else "train", dtype=dname, E=E, K=K, D=D, F=Fh, T=T,
                   pass_="fwd+bwd" if backward else "fwd", ratios={s: ratios(times, s) for s in STATS},
                   dense_ms={s: 1e3 * STAT[s](times["dense"]) for s in STATS},
                   samples_ms={n: [1e3 * t for t in ts] for n, ts in times.items()})
        if decode:
            row.update(touched=touched, bound_ms=1e3 * bound_s, moekit_over_bound={
                s: STAT[s](times["moekit"]) / bound_s if "moekit" in times and not backward else None for s in STATS})
        rows.append(row)
        print(f"  {dname:8s} {row['kind']:6s} T={T:<4d} E={E:<3d} K={K} {row['pass_']:7s} dense "
              f"{row['dense_ms'][args.stat]:8.2f} ms  "
              + "  ".join(f"{n} {v:.2f}" for n, v in row["ratios"][args.stat].items()), file=sys.stderr, flush=True)
    return rows


def fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}"


def print_table(rows: list[dict], dtype: str, bandwidth: float, stat: str) -> None:
    print(f"\n### {dtype} ({stat} time as a ratio to the dense SwiGLU FFN of equal active FLOPs; lower is better)\n")
    print("| shape | pass | moekit | naive | hf grouped_mm | hf eager | dense ms | moekit / read bound |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["dtype"] != dtype:
            continue
        shape = f"T={r['T']} E={r['E']} k={r['K']} d={r['D']} f={r['F']}"
        if r["kind"] == "decode":
            shape += f" (touched {r['touched']}/{r['E']}, bound {r['bound_ms']:.2f} ms)"
        cells = [fmt(r["ratios"][stat].get(n)) for n in CANDIDATES]
        bound = r["moekit_over_bound"][stat] if r["kind"] == "decode" else None
        print(f"| {shape} | {r['pass_']} | " + " | ".join(cells) + f" | {r['dense_ms'][stat]:.2f} | {fmt(bound)} |")
    print(f"\nMeasured read bandwidth: {bandwidth / 1e9:.1f} GB/s.")


def verdicts(rows: list[dict], stat: str) -> list[tuple[bool, str]]:
    """(passed, description) per target; targets whose rows were not measured are left out."""
    out = []
    rows = [dict(r, ratios=r["ratios"][stat], bound=r.get("moekit_over_bound", {}).get(stat)) for r in rows]

    def check(name: str, sel: list[dict], value, limit: float) -> None:
        vals = [(value(r), r) for r in sel if value(r) is not None]
        if vals:
            worst, r = max(vals, key=lambda v: v[0])
            out.append((worst <= limit, f"{name}: worst {worst:.2f} (T={r['T']} E={r['E']} k={r['K']}) vs <= {limit}"))

    for dtype, limit in TARGET_TRAIN.items():
        sel = [r for r in rows if r["dtype"] == dtype and r["kind"] == "train" and r["pass_"] == "fwd+bwd"]
        check(f"{dtype} training fwd+bwd moekit/dense", sel, lambda r: r["ratios"].get("moekit"), limit)
    for dtype in TARGET_TRAIN:
        sel = [r for r in rows if r["dtype"] == dtype]
        check(f"{dtype} moekit/hf_grouped in every row", sel,
              lambda r: r["ratios"]["moekit"] / r["ratios"]["hf_grouped"]
              if "moekit" in r["ratios"] and "hf_grouped" in r["ratios"] else None, 1.0)
        dec = [r for r in rows if r["dtype"] == dtype and r["kind"] == "decode" and r["pass_"] == "fwd"]
        check(f"{dtype} decode T=1 fwd moekit/dense", [r for r in dec if r["T"] == 1],
              lambda r: r["ratios"].get("moekit"), TARGET_DECODE_T1)
        check(f"{dtype} decode T=8 fwd moekit/read bound", [r for r in dec if r["T"] == 8],
              lambda r: r["bound"], TARGET_DECODE_T8)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: T=512, few repeats (< 1 min)")
    p.add_argument("--repeats", type=int, default=7, help="timed rounds per training shape (decode: 4x)")
    p.add_argument("--slow-repeats", type=int, default=3, help="timed rounds of naive and hf_eager (training)")
    p.add_argument("--stat", choices=STATS, default="median", help="statistic of the printed tables and verdicts")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--only", default=",".join(CANDIDATES), help="MoE candidates to run (dense always runs)")
    p.add_argument("--skip-naive", action="store_true")
    p.add_argument("--kinds", default="train,decode", help="which shapes: train, decode or both (default)")
    p.add_argument("--decode-backward", action="store_true", help="also time fwd+bwd at the decode shapes")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 resists a busy shared machine")
    p.add_argument("--json", help="write every median and sample to this file")
    p.add_argument("--no-malloc-tuning", action="store_true", help="leave glibc's malloc thresholds alone (default: "
                   "moekit.runtime.tune_cpu_allocator, as the moekit command does; it applies to every candidate)")
    args = p.parse_args()
    args.kinds = [k for k in args.kinds.split(",") if k]
    if not args.kinds or set(args.kinds) - {"train", "decode"}:
        p.error(f"--kinds {','.join(args.kinds)!r}: expected train, decode or train,decode")
    if not args.no_malloc_tuning:
        from moekit.runtime import tune_cpu_allocator

        tune_cpu_allocator()
    args.only = [n for n in args.only.split(",") if n and not (args.skip_naive and n == "naive")]
    unknown = set(args.only) - set(CANDIDATES)
    if unknown:
        p.error(f"unknown candidate(s) {sorted(unknown)}: expected a subset of {CANDIDATES}")
    if args.threads:
        torch.set_num_threads(args.threads)
    T_train = 512 if args.quick else 4096
    args.warmup = 2
    args.decode_repeats = 4 * args.repeats
    if args.quick:
        args.warmup, args.repeats, args.slow_repeats, args.decode_repeats = 0, min(args.repeats, 2), 1, 3

    buf = torch.ones(256 * 1024 * 1024)  # 1 GiB of float32, several times any last-level cache
    bandwidth = read_bandwidth(buf)
    flush = buf[: buf.numel() // 2]  # 512 MiB read before each decode call evicts the layer's weights
    load_before = os.getloadavg()[0]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, read bandwidth {bandwidth / 1e9:.1f} GB/s, "
          f"load average {load_before:.1f}", file=sys.stderr)

    rows: list[dict] = []
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if "bfloat16" in dtypes and kernels.bf16_matmul_emulated():
        print("note: this CPU has no bfloat16 matrix instructions, so PyTorch's bf16 GEMMs (the dense baseline, HF, "
              "the naive loop) are emulated: ~4x slower than float32 on AVX-512 CPUs, 8-35x on AVX2-only ones, where "
              "the bf16 training rows take hours (--dtypes float32 leaves them out)", file=sys.stderr)
    for dname in dtypes:
        dtype = getattr(torch, dname)
        for E, K, Fh in TRAIN_SHAPES if "train" in args.kinds else ():
            rows += bench_shape(E, K, TRAIN_D, Fh, T_train, dtype, args, False, flush, bandwidth)
        for T in (1, 8) if "decode" in args.kinds else ():
            rows += bench_shape(DECODE["E"], DECODE["K"], DECODE["D"], DECODE["F"], T, dtype, args, True, flush,
                                bandwidth)

    load = (load_before, os.getloadavg()[0])
    print(f"## moekit layer benchmark (torch {torch.__version__}, CPU, {torch.get_num_threads()} threads, "
          f"load average {load[0]:.1f} at start, {load[1]:.1f} at end, malloc tuning "
          f"{'off' if args.no_malloc_tuning else 'on'})")
    for dname in dtypes:
        print_table(rows, dname, bandwidth, args.stat)
    print("\n### Targets\n")
    for ok, text in verdicts(rows, args.stat):
        print(f"- {'PASS' if ok else 'FAIL'}  {text}")
    if args.json:
        meta = dict(torch=torch.__version__, threads=torch.get_num_threads(), bandwidth_Bps=bandwidth, load=load,
                    args={k: v for k, v in vars(args).items()})
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, results=rows), f, indent=1)


if __name__ == "__main__":
    main()
