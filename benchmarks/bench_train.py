"""Benchmark of a whole MoE language model: moekit's MoELM against transformers' MixtralForCausalLM.

Legend: B batch, S sequence, V vocabulary.

Both are the tiny-mixtral preset (4 layers, d_model 256, 4 query / 2 key-value heads, 8 SwiGLU experts of 384,
top-2, vocabulary 4096, tied embedding) with the SAME weights: MoELM is built, then its weights are copied into
HF's layout (q/k/v split from our fused projection; experts [E, D, 2F] -> gate_up_proj [E, 2F, D], [E, F, D] ->
down_proj [E, D, F]). Logits are checked to agree (max abs diff <= 1e-4) before anything is timed.

Candidates:
  moekit      MoELM: fused QKV, SDPA, moekit's MoE layer (sort-based dispatch, torch._grouped_mm experts).
  hf_grouped  MixtralForCausalLM with `experts_implementation="grouped_mm"` (transformers' fastest on CPU; also its
              default when torch has grouped_mm), SDPA attention.
  hf_eager    the same with `experts_implementation="eager"` (a Python loop over the experts hit).

Methodology:
  - Training: one step = forward on [B, S] tokens, loss (cross-entropy + the load-balancing loss each model's
    recipe uses: HF's router_aux_loss_coef 0.01 * Switch loss via output_router_logits; ours 0.01 * Switch +
    0.001 * z-loss), backward, AdamW step (lr 1e-4), zero_grad. Tokens/s = B*S / step time. Both score
    the same S-1 next-token targets (HF shifts `labels` itself; ours gets them shifted with the last one -100).
    The optimizer is the same for both: torch's fused AdamW, what `moekit train` uses and `transformers.Trainer`'s
    default (optim="adamw_torch_fused" on torch >= 2.8); `--foreach-adamw` times torch's foreach AdamW instead
    (30 ms more per step on the 2-core CPU, on both sides).
  - Decode: batch 1, a 16-token prompt, 64 new tokens, greedy, each through its own generate with its own KV cache:
    `moekit.generate.generate(..., greedy=True)` and HF `model.generate(..., do_sample=False, max_new_tokens=64,
    min_new_tokens=64)`. Tokens/s = 64 / time of the whole call (prefill included). Both must produce the same
    tokens (checked).
  - float32, CPU, torch's default thread count (override with --threads). Candidates run interleaved round-robin
    (the order rotates each round) after warm-up rounds; each number is the median over rounds. On a shared
    machine, contention slows the many-small-op paths most: the load average at start and end is printed.

Usage: python benchmarks/bench_train.py [--batch 8] [--seq 128] [--repeats 7] [--threads N] [--skip-eager]
       [--foreach-adamw] [--profile] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from moekit import MoELM
from moekit.generate import generate
from moekit.hf.mixtral import mixtral_config_kwargs, mixtral_state_dict
from moekit.presets import get_preset


def to_hf_mixtral(model: MoELM, experts_implementation: str):
    """A transformers MixtralForCausalLM with the same config and weights as a Mixtral-shaped MoELM."""
    from transformers import MixtralConfig, MixtralForCausalLM

    hf_config = MixtralConfig(
        **mixtral_config_kwargs(model), output_router_logits=True, router_aux_loss_coef=model.config.moe.aux_loss_coef,
        experts_implementation=experts_implementation, attn_implementation="sdpa",
    )
    hf = MixtralForCausalLM(hf_config)
    missing, unexpected = hf.load_state_dict(mixtral_state_dict(model), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"weight copy failed: missing {missing}, unexpected {unexpected}")
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    assert hf.config._experts_implementation == experts_implementation
    return hf


def train_step_fn(name: str, model, ids_BS1: torch.Tensor, fused: bool = True):
    """One training step of `model` on ids [B, S+1] as a closure; returns the loss."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, **({"fused": True} if fused else {"foreach": True}))
    inputs_BS = ids_BS1[:, :-1]
    if name == "moekit":
        targets_BS = ids_BS1[:, 1:].clone()
        targets_BS[:, -1] = -100  # the same S-1 targets HF's internal shift scores

        def step():
            loss = model(inputs_BS, targets=targets_BS).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss
    else:

        def step():
            loss = model(input_ids=inputs_BS, labels=inputs_BS).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss

    return step


def decode_fn(name: str, model, prompt_1S: torch.Tensor, new_tokens: int):
    if name == "moekit":
        return lambda: generate(model, prompt_1S, new_tokens, greedy=True)
    return lambda: model.generate(
        prompt_1S, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        attention_mask=torch.ones_like(prompt_1S),
    )


def round_robin(fns: dict, repeats: int, warmup: int) -> dict[str, list[float]]:
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(warmup + repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            start = time.perf_counter()
            fns[name]()
            elapsed = time.perf_counter() - start
            if r >= warmup:
                times[name].append(elapsed)
    return times


def check_agreement(models: dict, ids_BS: torch.Tensor, prompt_1S: torch.Tensor, new_tokens: int) -> None:
    with torch.no_grad():
        ours = models["moekit"].eval()(ids_BS).logits
        for name, hf in models.items():
            if name != "moekit":
                diff = (hf.eval()(ids_BS).logits - ours).abs().max().item()
                if diff > 1e-4:
                    raise RuntimeError(f"{name} logits differ from moekit's by {diff:.2e}")
        outs = {name: decode_fn(name, m, prompt_1S, new_tokens)() for name, m in models.items()}
    for name, out in outs.items():
        if not torch.equal(out, outs["moekit"]):
            raise RuntimeError(f"{name} greedy tokens differ from moekit's")
    for m in models.values():
        m.train()


def profile_step(name: str, fn, rows: int = 25) -> None:
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    print(f"\n#### profile: {name}\n")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny-mixtral")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--skip-eager", action="store_true", help="leave out HF's eager experts loop")
    p.add_argument("--foreach-adamw", action="store_true", help="time torch's foreach AdamW (both sides) instead of "
                   "the fused one")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of one training step each")
    p.add_argument("--json", help="write medians and samples to this file")
    p.add_argument("--no-malloc-tuning", action="store_true", help="leave glibc's malloc thresholds alone (default: "
                   "moekit.runtime.tune_cpu_allocator, as the moekit command does; it applies to every candidate)")
    args = p.parse_args()
    if not args.no_malloc_tuning:
        from moekit.runtime import tune_cpu_allocator

        tune_cpu_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]

    torch.manual_seed(0)
    cfg = get_preset(args.preset)
    moe = cfg.moe
    if moe is None or moe.router != "topk" or moe.num_shared_experts or cfg.first_k_dense or cfg.moe_every > 1:
        raise SystemExit(f"{args.preset} is not Mixtral-shaped; MixtralForCausalLM cannot express it")
    ours = MoELM(cfg)
    impls = ["grouped_mm"] + ([] if args.skip_eager else ["eager"])
    models = {"moekit": ours, **{f"hf_{impl.split('_')[0]}": to_hf_mixtral(ours, impl) for impl in impls}}
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(1))
    prompt = ids[:1, : args.prompt]
    check_agreement(models, ids[:, : args.seq], prompt, args.new_tokens)

    fused = not args.foreach_adamw
    train = round_robin({n: train_step_fn(n, m, ids, fused) for n, m in models.items()}, args.repeats, args.warmup)
    for m in models.values():
        m.eval()
    decode = round_robin({n: decode_fn(n, m, prompt, args.new_tokens) for n, m in models.items()},
                         args.repeats, args.warmup)
    if args.profile:
        for m in models.values():
            m.train()
        for name, m in models.items():
            profile_step(name, train_step_fn(name, m, ids, fused))

    tokens = args.batch * args.seq
    train_tps = {n: tokens / statistics.median(t) for n, t in train.items()}
    decode_tps = {n: args.new_tokens / statistics.median(t) for n, t in decode.items()}
    hf_names = [n for n in models if n != "moekit"]
    adamw = "foreach" if args.foreach_adamw else "fused"
    print(f"\n{args.preset}: {ours.num_params():,} params ({ours.active_params():,} active), float32, "
          f"{torch.get_num_threads()} threads; train batch [{args.batch}, {args.seq}] with {adamw} AdamW; decode "
          f"batch 1, prompt {args.prompt}, {args.new_tokens} new tokens greedy; median of {args.repeats} interleaved "
          f"rounds; "
          f"load average {load_start:.1f} -> {os.getloadavg()[0]:.1f}\n")
    header = "| | moekit | " + " | ".join(hf_names) + " | " + " | ".join(f"moekit / {n}" for n in hf_names) + " |"
    print(header)
    print("|" + "---|" * (2 + 2 * len(hf_names)))
    for label, tps in (("train tokens/s", train_tps), ("decode tokens/s", decode_tps)):
        cells = [f"{tps['moekit']:,.0f}"] + [f"{tps[n]:,.0f}" for n in hf_names]
        cells += [f"{tps['moekit'] / tps[n]:.2f}x" for n in hf_names]
        print(f"| {label} | " + " | ".join(cells) + " |")
    # Targets, against HF's fastest experts implementation for each workload.
    print()
    for label, tps, target in (("train", train_tps, 1.3), ("decode", decode_tps, 1.0)):
        best = max(hf_names, key=lambda n: tps[n])
        ratio = tps["moekit"] / tps[best]
        print(f"{'PASS' if ratio >= target else 'FAIL'}  {label}: moekit / fastest HF ({best}) = {ratio:.2f}x "
              f"(target >= {target}x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "train_seconds": train, "decode_seconds": decode,
                       "train_tokens_per_s": train_tps, "decode_tokens_per_s": decode_tps}, f, indent=2)


if __name__ == "__main__":
    main()
