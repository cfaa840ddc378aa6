"""All-to-all traffic of expert parallelism: the closed form moekit's dispatcher follows, and a projection of the
traffic and its time against the expert compute on a GPU cluster. Arithmetic only (no torch, no processes).

Legend: T tokens per rank (per micro-batch), K routed experts per token (top-k), S shared experts, D model dim,
F expert hidden dim, W = ep ranks, G GPUs per node, N = W / G nodes in an EP group, M the most nodes a token may
reach (node-limited routing), b bytes per row element.

Uniform routing puts each of a token's K slots on a uniformly random one of the W ranks, so on average
K * (1 - 1/W) of them leave the rank, each a row of D elements. The bytes a rank sends per token per MoE layer are

    dispatch = combine = K * (1 - 1/W) * D * b                                               (1)

one direction each, so 2 * K * (1 - 1/W) * D * b for the forward pass, and the backward pass moves the same again
(the gradient of an all-to-all is the reverse all-to-all). moekit also sends each slot's combine weight (b = 4)
with the dispatch and exchanges the E per-expert counts (8 bytes each, (1 - 1/W) of them leave the rank); both
are small next to the rows (1/D of them, and independent of T).

On a cluster, the rows that leave a node cross InfiniBand and the rest NVLink. Plain all-to-all (each slot goes to
its expert's GPU directly) sends K * (W - G) / W rows per token over InfiniBand. DeepSeek-V3 (§2.1.2, §3.2.2)
instead limits each token to M nodes and sends it once per destination node, where NVLink forwards it to the
experts' GPUs (DeepEP's kernels): at most M * (1 - 1/N) InfiniBand rows per token (the token's own node is one of
the M with probability M/N), and about K * (1 - 1/G) NVLink rows (a slot stays on the GPU it arrived at with
probability 1/G). Combine reverses the same paths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

FP8_TILE = 128  # DeepSeek-V3 §3.3.2: FP8 activations carry one FP32 scale per 1 x 128 tile


def bytes_per_row(d_model: int, dtype: str) -> float:
    """Bytes of one token's row of D activations as sent: "fp32", "bf16", or "fp8" (D bytes plus the FP32 scale of
    each 128-element tile)."""
    if dtype == "fp32":
        return 4.0 * d_model
    if dtype == "bf16":
        return 2.0 * d_model
    if dtype == "fp8":
        return d_model + 4.0 * math.ceil(d_model / FP8_TILE)
    raise ValueError(f"unknown row dtype {dtype!r}: expected 'fp32', 'bf16' or 'fp8'")


def all_to_all_bytes(top_k: int, ep: int, d_model: int, bytes_per_element: float) -> float:
    """Eq. (1): bytes one rank sends per token per MoE layer in one direction (dispatch or combine), uniform routing.

    Args:
        top_k: K, routed experts per token.
        ep: W, expert-parallel ranks.
        d_model: D.
        bytes_per_element: b (4 for float32, 2 for bfloat16).
    Returns:
        K * (1 - 1/W) * D * b.
    """
    if ep < 1 or top_k < 1 or d_model < 1:
        raise ValueError(f"need ep, top_k and d_model >= 1, got ep={ep}, top_k={top_k}, d_model={d_model}")
    return top_k * (1 - 1 / ep) * d_model * bytes_per_element


def rows_per_token(top_k: int, ep: int, gpus_per_node: int, node_limit: int | None = None) -> tuple[float, float]:
    """Rows a token sends in one direction over InfiniBand and over NVLink (expected, uniform routing).

    Args:
        top_k: K.
        ep: W, ranks of the EP group (whole nodes when W > G).
        gpus_per_node: G.
        node_limit: M, the most nodes a token reaches (sent once per node, forwarded over NVLink); None = plain
            all-to-all, every slot straight to its expert's GPU.
    Returns:
        (InfiniBand rows, NVLink rows) per token.
    """
    if ep > gpus_per_node and ep % gpus_per_node:
        raise ValueError(f"ep={ep} must be whole nodes of gpus_per_node={gpus_per_node} (or fit in one node)")
    nodes = max(1, ep // gpus_per_node)
    local = min(ep, gpus_per_node)
    if node_limit is None:
        return top_k * (ep - local) / ep, top_k * (local - 1) / ep
    reach = min(node_limit, nodes)
    return reach * (1 - 1 / nodes), top_k * (1 - 1 / local)


@dataclass(frozen=True)
class Cluster:
    """Per-GPU link and compute figures (defaults: an H800 node as DeepSeek-V3 describes it, §3.2.2)."""

    gpus_per_node: int = 8
    ib_GBps: float = 50.0  # InfiniBand per GPU, one direction: one 400 Gb/s NIC per GPU
    nvlink_GBps: float = 160.0  # NVLink per GPU as DeepSeek-V3 states it for the H800 (about 3.2x InfiniBand)
    peak_tflops: float = 989.0  # dense BF16 tensor-core peak of an H800 SXM (the H100 SXM's compute)
    mfu: float = 0.4  # fraction of the peak the expert GEMMs reach (an assumption, not a measurement)


@dataclass(frozen=True)
class MoEShape:
    """The MoE part of a model: what the all-to-all and the experts' FLOPs depend on."""

    d_model: int
    d_expert: int  # F, hidden width of one expert (SwiGLU: three D x F matrices)
    top_k: int
    num_experts: int
    num_shared: int
    moe_layers: int


DEEPSEEK_V3 = MoEShape(d_model=7168, d_expert=2048, top_k=8, num_experts=256, num_shared=1, moe_layers=58)


@dataclass(frozen=True)
class Projection:
    """One GPU's all-to-all traffic and expert compute (see `project`). Bytes and seconds are per GPU."""

    ib_rows: float  # InfiniBand rows per token, one direction
    nvlink_rows: float  # NVLink rows per token, one direction
    ib_bytes_per_token: float  # per MoE layer, forward (dispatch + combine)
    nvlink_bytes_per_token: float  # per MoE layer, forward (dispatch + combine)
    layer_ib_s: float  # one MoE layer's forward all-to-all over InfiniBand, for the micro-batch
    layer_nvlink_s: float  # ... over NVLink (runs concurrently with the InfiniBand part)
    layer_expert_s: float  # one MoE layer's forward expert GEMMs (routed + shared) at the assumed MFU
    step_bytes: float  # InfiniBand bytes of the micro-batch's forward + backward over every MoE layer
    step_comm_s: float  # all-to-all time of that (the slower link), forward + backward
    step_expert_s: float  # expert compute of that, forward + backward (backward = 2x forward)

    @property
    def comm_to_compute(self) -> float:
        return self.step_comm_s / self.step_expert_s


def project(
    model: MoEShape, cluster: Cluster, ep: int, tokens_per_gpu: int, dispatch_dtype: str = "bf16",
    combine_dtype: str = "bf16", node_limit: int | None = None,
) -> Projection:
    """The all-to-all of one micro-batch on one GPU against its expert compute, uniform routing.

    The backward moves the same bytes as the forward (DeepSeek-V3 §3.3.2 keeps the backward's dispatch-side
    gradients in FP8 and its combine side in BF16 too) and computes twice the forward's FLOPs.

    Args:
        model: the MoE shape (DEEPSEEK_V3, ...).
        cluster: link bandwidths and compute.
        ep: expert-parallel GPUs.
        tokens_per_gpu: T, tokens of the micro-batch on each GPU.
        dispatch_dtype, combine_dtype: row formats ("bf16", "fp8", "fp32"; see `bytes_per_row`).
        node_limit: M nodes per token (DeepSeek-V3: 4) or None for plain all-to-all.
    """
    ib_rows, nvlink_rows = rows_per_token(model.top_k, ep, cluster.gpus_per_node, node_limit)
    row = bytes_per_row(model.d_model, dispatch_dtype) + bytes_per_row(model.d_model, combine_dtype)
    ib_bytes, nvlink_bytes = ib_rows * row, nvlink_rows * row
    # SwiGLU expert: 3 matrices of D x F, 2 FLOPs per multiply-add; each token runs K routed + S shared experts,
    # and uniform routing gives every GPU T * K routed slots to compute.
    flops = 2 * 3 * model.d_model * model.d_expert * (model.top_k + model.num_shared) * tokens_per_gpu
    layer_expert_s = flops / (cluster.peak_tflops * 1e12 * cluster.mfu)
    layer_ib_s = tokens_per_gpu * ib_bytes / (cluster.ib_GBps * 1e9)
    layer_nvlink_s = tokens_per_gpu * nvlink_bytes / (cluster.nvlink_GBps * 1e9)
    fwd_bwd = 2 * model.moe_layers  # the backward moves the forward's bytes again
    return Projection(
        ib_rows=ib_rows,
        nvlink_rows=nvlink_rows,
        ib_bytes_per_token=ib_bytes,
        nvlink_bytes_per_token=nvlink_bytes,
        layer_ib_s=layer_ib_s,
        layer_nvlink_s=layer_nvlink_s,
        layer_expert_s=layer_expert_s,
        step_bytes=fwd_bwd * tokens_per_gpu * ib_bytes,
        step_comm_s=fwd_bwd * max(layer_ib_s, layer_nvlink_s),
        step_expert_s=3 * model.moe_layers * layer_expert_s,
    )
