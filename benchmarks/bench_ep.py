"""Bytes the expert-parallel all-to-alls really send, beside the closed form, and a DeepSeek-V3-sized projection.

Legend: T tokens per rank, K experts per token, E experts, D model dim, W = ep ranks, b bytes per element.

Measured: W gloo processes on this machine (CPU) each run one sharded MoE layer (`shard_experts` over a ("dp", "ep")
mesh with ep = W) on T tokens, forward then backward, inside `moekit.parallel.count_bytes()`, which adds up what
the dispatcher hands to all_to_all_single for other ranks (rows kept on their own rank are not counted): the token
rows (dispatch and combine), the combine weights travelling with them, and the per-expert count exchange. Reported
per token per layer, averaged over the ranks.

Formula (moekit.parallel.projection, eq. 1; uniform routing): the rows a rank sends per token per layer in one
direction are K * (1 - 1/W) * D * b, so the forward's dispatch + combine is 2 * K * (1 - 1/W) * D * b and the
backward moves the same again. Combine weights add K * (1 - 1/W) * 4 to the dispatch (the router works in float32
whatever the layer's dtype), the count exchange E * (1 - 1/W) * 8 bytes per forward (per rank: / T per token).

Routing: "exact" gives token t the experts t, t+1, ..., t+K-1 (mod E) through a router built for it, so every rank
sends exactly T*K/E slots to each expert: the formula holds to the byte. "learned" is a randomly initialised router
on random inputs: uniform only in expectation, so the ratio is 1 up to sampling noise.

The projection applies the same form to DeepSeek-V3 on a 256-GPU H800 cluster; every assumption is printed with it.

Usage: python benchmarks/bench_ep.py [--ranks 2,4] [--tokens 1024] [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moekit.config import MoEConfig
from moekit.layers import MoE
from moekit.parallel import build_mesh, count_bytes, shard_experts
from moekit.parallel.projection import DEEPSEEK_V3, Cluster, all_to_all_bytes, project

D, FF, E = 64, 32, 16
CASES = [  # (K, routing, dtype)
    (1, "exact", torch.float32), (2, "exact", torch.float32), (4, "exact", torch.float32),
    (8, "exact", torch.float32), (2, "exact", torch.bfloat16), (2, "learned", torch.float32),
    (8, "learned", torch.float32),
]


def _layer(top_k: int, routing: str, dtype: torch.dtype) -> MoE:
    torch.manual_seed(0)
    layer = MoE(MoEConfig(d_model=D, d_ff=FF, num_experts=E, top_k=top_k))
    if routing == "exact":  # logit of expert e = x[e]: the inputs below then choose the experts
        with torch.no_grad():
            layer.router.weight.zero_()
            layer.router.weight[:, :E] = torch.eye(E)
    return layer.to(dtype)


def _inputs(rank: int, tokens: int, top_k: int, routing: str, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1 + rank)
    x_TD = torch.randn(tokens, D, generator=generator)
    if routing == "exact":  # token t: experts t..t+K-1 (mod E) get logits K..1, every other expert 0
        x_TD[:, :E] = 0
        t = torch.arange(tokens)
        for j in range(top_k):
            x_TD[t, (t + j) % E] = float(top_k - j)
    return x_TD.to(dtype)


def _measure(rank: int, world: int, tokens: int) -> list[dict]:
    mesh = build_mesh(world)
    rows = []
    for top_k, routing, dtype in CASES:
        layer = shard_experts(_layer(top_k, routing, dtype), mesh)
        x_TD = _inputs(rank, tokens, top_k, routing, dtype).requires_grad_(True)
        with count_bytes() as fwd:
            y_TD = layer(x_TD)
        with count_bytes() as bwd:
            y_TD.float().square().sum().backward()
        sums = torch.tensor([fwd.tokens, fwd.weights, fwd.counts, bwd.tokens, bwd.weights], dtype=torch.float64)
        dist.all_reduce(sums)
        per_token = (sums / (world * tokens)).tolist()  # mean over ranks, per token
        b = torch.empty((), dtype=dtype).element_size()
        rows.append({
            "ranks": world, "top_k": top_k, "routing": routing, "dtype": str(dtype).removeprefix("torch."),
            "tokens_per_rank": tokens, "fwd_rows": per_token[0], "fwd_weights": per_token[1],
            "counts": per_token[2], "bwd_rows": per_token[3], "bwd_weights": per_token[4],
            "formula_fwd_rows": 2 * all_to_all_bytes(top_k, world, D, b),
            "formula_weights": all_to_all_bytes(top_k, world, 1, 4),  # float32 router weights
            "formula_counts": E * (1 - 1 / world) * 8 / tokens,
        })
    return rows


def _entry(rank: int, world: int, init_file: str, tokens: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                           timeout=datetime.timedelta(seconds=60))
    try:
        rows = _measure(rank, world, tokens)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(rows, f)
    finally:
        dist.destroy_process_group()


def measure(world: int, tokens: int) -> list[dict]:
    """Run the cases on `world` gloo processes; returns one row per case."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        mp.start_processes(_entry, args=(world, os.path.join(tmp, "rendezvous"), tokens, out), nprocs=world,
                           start_method="spawn")
        with open(out) as f:
            return json.load(f)


def format_measured(rows: list[dict]) -> str:
    lines = [
        f"D={D}, E={E}, one MoE layer, bytes per token per layer sent to other ranks (mean over ranks)",
        "| W | K | routing | dtype | fwd rows | formula 2K(1-1/W)Db | ratio | bwd rows / fwd formula | "
        "weights (fwd) / K(1-1/W)4 | counts / token | total fwd / formula |",
        "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        total = r["fwd_rows"] + r["fwd_weights"] + r["counts"]
        formula = r["formula_fwd_rows"] + r["formula_weights"] + r["formula_counts"]
        lines.append(
            f"| {r['ranks']} | {r['top_k']} | {r['routing']} | {r['dtype']} | {r['fwd_rows']:,.1f} | "
            f"{r['formula_fwd_rows']:,.1f} | {r['fwd_rows'] / r['formula_fwd_rows']:.3f} | "
            f"{r['bwd_rows'] / r['formula_fwd_rows']:.3f} | {r['fwd_weights'] / r['formula_weights']:.3f} | "
            f"{r['counts']:.3f} | {total / formula:.3f} |"
        )
    return "\n".join(lines)


PROJECTION_CASES = [  # (label, ep, node_limit, dispatch dtype)
    ("EP=64 (8 nodes), node-limited M=4, FP8 dispatch", 64, 4, "fp8"),
    ("EP=64 (8 nodes), plain all-to-all, FP8 dispatch", 64, None, "fp8"),
    ("EP=256 (32 nodes), node-limited M=4, FP8 dispatch", 256, 4, "fp8"),
    ("EP=256 (32 nodes), node-limited M=4, BF16 dispatch", 256, 4, "bf16"),
    ("EP=256 (32 nodes), plain all-to-all, BF16 dispatch", 256, None, "bf16"),
]


GLOBAL_BATCH_TOKENS = 15360 * 4096  # DeepSeek-V3's batch after its ramp-up (§4.2): 15,360 sequences of 4K tokens
GPUS = 256


def format_projection(tokens_per_gpu: int = 4096, cluster: Cluster = Cluster()) -> str:
    m = DEEPSEEK_V3
    micro_batches = GLOBAL_BATCH_TOKENS // (GPUS * tokens_per_gpu)
    lines = [
        f"DeepSeek-V3 MoE: D={m.d_model}, {m.num_experts} routed experts of F={m.d_expert} + {m.num_shared} shared, "
        f"top-{m.top_k}, {m.moe_layers} MoE layers (of 61); {GPUS} GPUs = {GPUS // cluster.gpus_per_node} nodes x "
        f"{cluster.gpus_per_node} (EP=64: 4 EP groups, data parallel over them).",
        f"Assumed: {tokens_per_gpu} tokens per GPU per micro-batch; InfiniBand {cluster.ib_GBps:g} GB/s per GPU "
        f"(one 400 Gb/s NIC each) and NVLink {cluster.nvlink_GBps:g} GB/s per GPU, one direction, fully used;",
        f"expert GEMMs at {cluster.mfu:.0%} of {cluster.peak_tflops:g} TFLOP/s dense BF16 (H800) = "
        f"{cluster.peak_tflops * cluster.mfu:.0f} TFLOP/s; uniform routing; combine in BF16; FP8 rows carry one "
        "FP32 scale per 128 values;",
        "node-limited: a token reaches M nodes (an upper bound), crossing InfiniBand once per remote node, then "
        "NVLink; the backward moves the forward's bytes again and computes 2x its FLOPs; no overlap counted.",
        "",
        "| layout | IB rows/token | IB bytes/token/layer (fwd) | per layer fwd: IB ms | NVLink ms | expert ms | "
        "per micro-batch fwd+bwd, 58 layers: IB GB | all-to-all s | expert s | all-to-all / expert |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, ep, node_limit, dispatch in PROJECTION_CASES:
        p = project(m, cluster, ep, tokens_per_gpu, dispatch, "bf16", node_limit)
        lines.append(
            f"| {label} | {p.ib_rows:.3f} | {p.ib_bytes_per_token:,.0f} | {p.layer_ib_s * 1e3:.2f} | "
            f"{p.layer_nvlink_s * 1e3:.2f} | {p.layer_expert_s * 1e3:.2f} | {p.step_bytes / 1e9:.1f} | "
            f"{p.step_comm_s:.3f} | {p.step_expert_s:.3f} | {p.comm_to_compute:.2f} |"
        )
    p = project(m, cluster, 256, tokens_per_gpu, "fp8", "bf16", 4)
    lines += [
        "",
        f"One optimizer step of {GLOBAL_BATCH_TOKENS:,} tokens over {GPUS} GPUs is {micro_batches} such micro-batches "
        f"per GPU: with EP=256, M=4, FP8 dispatch, {micro_batches * p.step_bytes / 1e12:.2f} TB over each GPU's "
        f"InfiniBand, {micro_batches * p.step_comm_s:.0f} s of all-to-all against {micro_batches * p.step_expert_s:.0f}"
        " s of expert GEMMs if nothing overlaps (DeepSeek-V3 overlaps them: DualPipe, dedicated communication SMs).",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", default="2,4", help="process counts to measure, comma-separated (default 2,4)")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per rank (default 1024, a multiple of E)")
    parser.add_argument("--json", help="also write the measured rows to this file")
    args = parser.parse_args()
    if args.tokens < 1 or args.tokens % E:
        parser.error(f"--tokens {args.tokens} must be a positive multiple of E={E} (exact routing fills every expert)")
    start = time.perf_counter()
    rows = [row for world in (int(w) for w in args.ranks.split(",")) for row in measure(world, args.tokens)]
    print(format_measured(rows))
    print(f"\n(measured in {time.perf_counter() - start:.0f} s)\n")
    print(format_projection())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
