"""Benchmark of moekit's fused C++ CPU kernels (moekit/layers/kernels) against the PyTorch forms they replace.

Each case runs the same autograd Function (or a whole training step) twice per round, once with the kernels and
once with them switched off (the PyTorch forms moekit runs where the kernels cannot), interleaved, order alternating;
medians after warm-up. Ratios > 1 mean the kernels are faster.

Cases (float32, shapes of tiny-mixtral's training step: batch 8 x 128 tokens, d=256, 8 experts top-2, f=384):
  swiglu   SwiGLU with the combine scale over the expert rows, fwd+bwd, h [2048, 768]
  rmsnorm  RMSNorm fwd+bwd, x [8, 128, 256]
  rope     RoPE fwd+bwd into a heads-major buffer, q [8, 128, 8, 64]
  xent     the language model's cross-entropy fwd+bwd, logits [1024, 4096]
  attn     causal GQA attention fwd+bwd, q [8, 4, 128, 64], k and v [8, 2, 128, 64] (off: SDPA's flash kernel)
  attn512  the same, forward only without autograd (a prefill), q [1, 8, 512, 64], k and v [1, 4, 512, 64]
  step     one whole tiny-mixtral training step (fwd, bwd, fused AdamW)

Usage: python benchmarks/bench_kernels.py [--threads N] [--repeats 30] [--step-repeats 12]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_train import train_step_fn  # noqa: E402

from moekit.layers import kernels  # noqa: E402
from moekit.layers.attention import _RMSNorm, apply_rope, causal_attention  # noqa: E402
from moekit.layers.experts import _ScaledSwiGLU  # noqa: E402
from moekit.models.lm import MoELM, cross_entropy  # noqa: E402
from moekit.presets import get_preset  # noqa: E402


def fwd_bwd(fn, *inputs):
    def run():
        out = fn(*inputs)
        out.backward(torch.ones_like(out))

    return run


def cases() -> dict:
    gen = torch.Generator().manual_seed(0)
    h, s = torch.randn(2048, 768, generator=gen).requires_grad_(), torch.rand(2048, generator=gen).requires_grad_()
    x, w = torch.randn(8, 128, 256, generator=gen).requires_grad_(), torch.randn(256, generator=gen).requires_grad_()
    q = torch.randn(8, 128, 8, 64, generator=gen).requires_grad_()
    cos, sin = torch.randn(128, 64, generator=gen), torch.randn(128, 64, generator=gen)
    logits = torch.randn(1024, 4096, generator=gen).requires_grad_()
    targets = torch.randint(0, 4096, (1024,), generator=gen)
    qa, ka, va = (torch.randn(8, n, 128, 64, generator=gen).requires_grad_() for n in (4, 2, 2))
    qp, kp, vp = (torch.randn(1, n, 512, 64, generator=gen) for n in (8, 4, 4))

    def prefill():
        with torch.no_grad():
            causal_attention(qp, kp, vp)

    return {
        "swiglu": fwd_bwd(lambda h, s: _ScaledSwiGLU.apply(h, s), h, s),
        "rmsnorm": fwd_bwd(lambda x, w: _RMSNorm.apply(x, w, 1e-5), x, w),
        "rope": fwd_bwd(lambda q: apply_rope(q, cos, sin, heads_major=True), q),
        "xent": fwd_bwd(cross_entropy, logits, targets),
        "attn": fwd_bwd(causal_attention, qa, ka, va),
        "attn512": prefill,
    }


def ab(fn, module, repeats: int, warmup: int = 3) -> tuple[float, float]:
    """Median seconds (kernels on, kernels off), interleaved with alternating order."""
    times: dict[bool, list[float]] = {True: [], False: []}
    for r in range(warmup + repeats):
        for on in (True, False) if r % 2 else (False, True):
            kernels._module = module if on else None
            t0 = time.perf_counter()
            fn()
            if r >= warmup:
                times[on].append(time.perf_counter() - t0)
    kernels._module = module
    return statistics.median(times[True]), statistics.median(times[False])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--step-repeats", type=int, default=12)
    p.add_argument("--no-malloc-tuning", action="store_true")
    args = p.parse_args()
    if not args.no_malloc_tuning:
        from moekit.runtime import tune_cpu_allocator

        tune_cpu_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    module = kernels.cpu_kernels()
    if module is None:
        raise SystemExit("moekit's C++ kernels are not available here (disabled, or the build failed): nothing to "
                         "compare")
    kernels._tried = True

    rows = {name: ab(fn, module, args.repeats) for name, fn in cases().items()}
    torch.manual_seed(0)
    cfg = get_preset("tiny-mixtral")
    ids = torch.randint(0, cfg.vocab_size, (8, 129), generator=torch.Generator().manual_seed(1))
    rows["step"] = ab(train_step_fn("moekit", MoELM(cfg), ids), module, args.step_repeats)

    print(f"\nfused CPU kernels vs the PyTorch forms, float32, {torch.get_num_threads()} threads, medians of "
          f"{args.repeats} interleaved rounds ({args.step_repeats} for the step)\n")
    print("| case | kernels ms | PyTorch ms | PyTorch / kernels |")
    print("|---|---:|---:|---:|")
    for name, (on, off) in rows.items():
        print(f"| {name} | {on * 1e3:.2f} | {off * 1e3:.2f} | {off / on:.2f}x |")


if __name__ == "__main__":
    main()
