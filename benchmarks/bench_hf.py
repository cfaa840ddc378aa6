"""Benchmark of an imported Hugging Face MoE checkpoint: moekit's `load_pretrained` against transformers'
`from_pretrained` on the SAME folder, prefill and decode, CPU, same run.

Legend: S prompt length, N new tokens.

The folder is a random model of a released family's shape, scaled down to run on a laptop CPU (default: an
OLMoE-shaped model, 64 fine-grained experts, top-8 — the issue asks for >= 16 experts), written by transformers'
`save_pretrained` into a temporary folder. Both sides load that folder; logits are checked to agree (max abs
diff <= 1e-4) and the greedy continuations to be identical before anything is timed.

Candidates:
  moekit      moekit.hf.load_pretrained(folder): moekit's layers and dispatch (sort, per-expert GEMMs on the
              hit experts only, embedding_bag combine).
  hf_grouped  transformers' model with experts_implementation="grouped_mm" (its default where torch has it).
  hf_eager    the same with experts_implementation="eager" (a Python loop over the experts hit).

Methodology:
  - Prefill: one no-grad forward of a [1, S] prompt (logits included). Tokens/s = S / time.
  - Decode: batch 1, a 16-token prompt, N new tokens, greedy, through each side's own generate and KV cache
    (`model.generate(ids, N, greedy=True)` vs `generate(do_sample=False, min_new_tokens=N)`). Tokens/s = N / time
    of the whole call (its prefill included, as a user sees it).
  - float32, the model's threads (override --threads); candidates interleaved round-robin, order rotating, after
    warm-up rounds; medians. Load average at start and end is printed (the machine may be shared).

Usage: python benchmarks/bench_hf.py [--family olmoe|mixtral|qwen3_moe|qwen2_moe|deepseek_v3|gpt_oss|granitemoe|
       phimoe|dbrx]
       [--prefill 512] [--new-tokens 32] [--repeats 7] [--threads N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_train import round_robin  # noqa: E402

import moekit.hf as mhf  # noqa: E402

COMMON = dict(vocab_size=8192, hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
              max_position_embeddings=2048)  # fmt: skip
FAMILIES = {  # model_type -> (transformers classes, config kwargs): released shapes, scaled down
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              dict(COMMON, intermediate_size=256, num_experts=64, num_experts_per_tok=8)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(COMMON, moe_intermediate_size=256, intermediate_size=1024, num_experts=64,
                       num_experts_per_tok=8, head_dim=64)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(COMMON, moe_intermediate_size=256, shared_expert_intermediate_size=1024,
                       intermediate_size=1024, num_experts=60, num_experts_per_tok=4)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(COMMON, intermediate_size=512, num_local_experts=16, num_experts_per_tok=2)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(COMMON, intermediate_size=1024, moe_intermediate_size=256, n_routed_experts=64,
                         num_experts_per_tok=6, n_shared_experts=2, first_k_dense_replace=1, n_group=8,
                         topk_group=4, kv_lora_rank=128, q_lora_rank=192, qk_rope_head_dim=32,
                         qk_nope_head_dim=64, v_head_dim=64, num_key_value_heads=8)),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                dict(COMMON, intermediate_size=256, num_local_experts=32, num_experts_per_tok=4, head_dim=64,
                     sliding_window=128)),
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM",
                   dict(COMMON, intermediate_size=128, num_local_experts=40, num_experts_per_tok=8,
                        embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=1 / 64,
                        logits_scaling=6.0, tie_word_embeddings=True)),
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM",
               dict(COMMON, intermediate_size=512, num_local_experts=16, num_experts_per_tok=2, attention_bias=True,
                    lm_head_bias=True)),
    "dbrx": ("DbrxConfig", "DbrxForCausalLM",
             dict(vocab_size=8192, d_model=512, n_layers=4, n_heads=8, max_seq_len=2048,
                  attn_config={"kv_n_heads": 4, "clip_qkv": 8.0, "rope_theta": 500000.0},
                  rope_parameters={"rope_type": "default", "rope_theta": 500000.0},  # where transformers reads it
                  ffn_config={"ffn_hidden_size": 512, "moe_num_experts": 16, "moe_top_k": 4})),
}  # fmt: skip


LOOP_ONLY = {"dbrx"}  # transformers' DBRX has one experts implementation (a loop): compared as hf_eager only


def build_folder(family: str, folder: Path) -> None:
    import transformers

    config_cls, model_cls, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs))
    model.save_pretrained(folder)


def load_hf(folder: Path, family: str, impl: str):
    import transformers

    experts = {} if family in LOOP_ONLY else {"experts_implementation": impl}
    model = getattr(transformers, FAMILIES[family][1]).from_pretrained(
        folder, dtype=torch.float32, attn_implementation="sdpa", **experts
    )
    return model.eval()


def prefill_fn(name: str, model, ids_1S: torch.Tensor):
    def run():
        with torch.no_grad():
            return model(ids_1S).logits

    return run


def decode_fn(name: str, model, prompt_1S: torch.Tensor, new_tokens: int):
    if name == "moekit":
        return lambda: model.generate(prompt_1S, new_tokens, greedy=True)
    return lambda: model.generate(
        prompt_1S, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        attention_mask=torch.ones_like(prompt_1S), pad_token_id=0, eos_token_id=None,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--family", default="olmoe", choices=sorted(FAMILIES))
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--skip-eager", action="store_true")
    p.add_argument("--json", help="write medians and samples to this file")
    p.add_argument("--no-malloc-tuning", action="store_true", help="leave glibc's malloc thresholds alone (default: "
                   "moekit.runtime.tune_cpu_allocator, as the moekit command does; it applies to every candidate)")
    args = p.parse_args()
    if not args.no_malloc_tuning:
        from moekit.runtime import tune_cpu_allocator

        tune_cpu_allocator()
    if args.family not in mhf.supported_model_types():
        raise SystemExit(f"moekit.hf does not load {args.family} yet: {mhf.supported_model_types()}")
    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        build_folder(args.family, folder)
        models = {"moekit": mhf.load_pretrained(folder, dtype=torch.float32)}
        if args.family not in LOOP_ONLY:
            models["hf_grouped"] = load_hf(folder, args.family, "grouped_mm")
        if not args.skip_eager or args.family in LOOP_ONLY:
            models["hf_eager"] = load_hf(folder, args.family, "eager")
    vocab = models["moekit"].config.vocab_size
    ids = torch.randint(0, vocab, (1, args.prefill), generator=torch.Generator().manual_seed(1))
    prompt = ids[:, : args.prompt]
    with torch.no_grad():
        ours = models["moekit"](ids).logits
        for name, m in models.items():
            diff = (m(ids).logits - ours).abs().max().item()
            if diff > 1e-4:
                raise RuntimeError(f"{name} logits differ from moekit's by {diff:.2e}")
        outs = {n: decode_fn(n, m, prompt, args.new_tokens)() for n, m in models.items()}
    for name, out in outs.items():
        if not torch.equal(out, outs["moekit"]):
            raise RuntimeError(f"{name} greedy tokens differ from moekit's")

    prefill = round_robin({n: prefill_fn(n, m, ids) for n, m in models.items()}, args.repeats, args.warmup)
    decode = round_robin({n: decode_fn(n, m, prompt, args.new_tokens) for n, m in models.items()},
                         args.repeats, args.warmup)
    prefill_tps = {n: args.prefill / statistics.median(t) for n, t in prefill.items()}
    decode_tps = {n: args.new_tokens / statistics.median(t) for n, t in decode.items()}
    ours = models["moekit"]
    hf_names = [n for n in models if n != "moekit"]
    moe = ours.config.moe
    print(f"\n{args.family}-shaped: {ours.num_params():,} params ({ours.active_params():,} active), "
          f"{moe.num_experts} experts top-{moe.top_k}, float32, {torch.get_num_threads()} threads; prefill [1, "
          f"{args.prefill}]; decode prompt {args.prompt} + {args.new_tokens} greedy; median of {args.repeats} "
          f"interleaved rounds; load average {load_start:.1f} -> {os.getloadavg()[0]:.1f}\n")
    print("| | moekit | " + " | ".join(hf_names) + " | " + " | ".join(f"moekit / {n}" for n in hf_names) + " |")
    print("|" + "---|" * (2 + 2 * len(hf_names)))
    for label, tps in (("prefill tokens/s", prefill_tps), ("decode tokens/s", decode_tps)):
        cells = [f"{tps['moekit']:,.0f}"] + [f"{tps[n]:,.0f}" for n in hf_names]
        cells += [f"{tps['moekit'] / tps[n]:.2f}x" for n in hf_names]
        print(f"| {label} | " + " | ".join(cells) + " |")
    best_prefill = max(prefill_tps[n] for n in hf_names)
    best_decode = max(decode_tps[n] for n in hf_names)
    print(f"\ntargets vs transformers' fastest: prefill >= 1.2x: {prefill_tps['moekit'] / best_prefill:.2f}x; "
          f"decode >= 1.0x: {decode_tps['moekit'] / best_decode:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"family": args.family, "prefill": prefill, "decode": decode,
                                               "prefill_tps": prefill_tps, "decode_tps": decode_tps}, indent=2))


if __name__ == "__main__":
    main()
