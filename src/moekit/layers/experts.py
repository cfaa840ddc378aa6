"""Experts: E feed-forward networks stored as stacked tensors, run as grouped matrix multiplies.

Legend: M rows (token-slots sorted by expert), D model dim, F expert hidden dim, E experts.

`Experts.forward` takes rows already grouped into contiguous per-expert segments (the dispatcher's job) and the
number of rows per expert. It never sees routing: experts do not know how rows were chosen.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.config import ACTIVATIONS, EXPERT_IMPLS, GATED_ACTIVATIONS
from moekit.layers import dispatch, kernels

_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TORCH_VERSION = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])


def activate(h_MX: Tensor, activation: str, swiglu_alpha: float = 1.702, swiglu_limit: float = 7.0) -> Tensor:
    """Apply an FFN activation; gated ones split `h` into (gate, up) halves along the last dim.

    swiglu_alpha and swiglu_limit are the constants of "swiglu_oai" (GPT-OSS's clamped SwiGLU, see MoEConfig).
    """
    if activation == "swiglu":
        gate, up = h_MX.chunk(2, dim=-1)
        return F.silu(gate) * up
    if activation == "geglu":
        gate, up = h_MX.chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh") * up
    if activation == "swiglu_oai":  # the order of operations of GPT-OSS's reference, for equal rounding
        gate, up = h_MX.chunk(2, dim=-1)
        gate = gate.clamp(max=swiglu_limit)
        up = up.clamp(min=-swiglu_limit, max=swiglu_limit)
        return (up + 1) * (gate * torch.sigmoid(gate * swiglu_alpha))
    if activation == "relu":
        return F.relu(h_MX)
    if activation == "gelu":
        return F.gelu(h_MX)
    if activation == "silu":
        return F.silu(h_MX)
    raise ValueError(f"unknown activation {activation!r}: expected one of {', '.join(map(repr, ACTIVATIONS))}")


class _ScaledSwiGLU(torch.autograd.Function):
    """silu(gate) * up * scale in one autograd node (fwd: 1 allocation; bwd: writes both halves of the gradient
    into one buffer instead of allocating two and concatenating them).

    On float32 CPU tensors both directions are one C++ pass each (layers/kernels: ~3x faster than the PyTorch form
    below, which runs everywhere else).
    """

    @staticmethod
    def forward(ctx, h_MX: Tensor, scale_M: Tensor | None) -> Tensor:  # type: ignore[override]
        if scale_M is not None:
            scale_M = scale_M.contiguous()
        ctx.fused = h_MX.is_contiguous() and kernels.usable(h_MX, scale_M)
        if ctx.fused:  # one pass in C++ (layers/kernels)
            ctx.save_for_backward(h_MX, scale_M)
            return kernels.cpu_kernels().swiglu_forward(h_MX, scale_M)
        F_ = h_MX.shape[-1] // 2
        gate_MF, up_MF = h_MX[:, :F_], h_MX[:, F_:]
        out_MF = F.silu(gate_MF).mul_(up_MF)
        if scale_M is not None:
            out_MF.mul_(scale_M.unsqueeze(1))
        ctx.save_for_backward(h_MX, scale_M)
        return out_MF

    @staticmethod
    def backward(ctx, grad_MF: Tensor):  # type: ignore[override]
        h_MX, scale_M = ctx.saved_tensors
        if ctx.fused:
            grad_h_MX, grad_scale_M = kernels.cpu_kernels().swiglu_backward(
                grad_MF.contiguous(), h_MX, scale_M, scale_M is not None and ctx.needs_input_grad[1]
            )
            return grad_h_MX, grad_scale_M
        F_ = h_MX.shape[-1] // 2
        gate_MF, up_MF = h_MX[:, :F_], h_MX[:, F_:]
        grad_h_MX = torch.empty_like(h_MX)
        grad_gate_MF, grad_up_MF = grad_h_MX[:, :F_], grad_h_MX[:, F_:]
        sig_MF = torch.sigmoid(gate_MF)
        act_MF = gate_MF * sig_MF
        grad_scale_M = None
        torch.mul(grad_MF, act_MF, out=grad_up_MF)
        if scale_M is not None:
            scale_M1 = scale_M.unsqueeze(1)
            if ctx.needs_input_grad[1]:
                grad_scale_M = torch.linalg.vecdot(grad_up_MF, up_MF)  # sum_f grad * silu(gate) * up
            grad_up_MF.mul_(scale_M1)
            grad_MF = grad_MF * scale_M1
        # d silu(g) / dg = sig * (1 + g - silu(g))
        dsilu_MF = act_MF.neg_().add_(gate_MF).add_(1.0).mul_(sig_MF)
        torch.mul(grad_MF, up_MF, out=grad_gate_MF).mul_(dsilu_MF)
        return grad_h_MX, grad_scale_M


class _FusedSwiGLUExperts(torch.autograd.Function):
    """Plain SwiGLU experts (no biases) over expert-sorted rows in one C++ call each way (layers/kernels,
    float32 CPU): per expert, x_e @ w_in[e] -> silu(gate) * up * scale -> @ w_out[e], and in backward the five
    products and the SwiGLU backward of that expert back to back, so its intermediates stay in cache. Saves x and
    h [M, 2F]; the activation is not kept: the backward's SwiGLU pass writes it again per expert.

    With a dispatch plan, x is the [T, D] token tensor and the node is gather + experts + combine: each expert's
    rows are gathered into a cached scratch right before its GEMM (forward, and the output gradient's rows in
    backward), and its output rows (the input gradient's in backward) are added into their tokens right after, so
    no [M, D] tensor (gathered input, per-slot output, their gradients) is ever materialised.
    """

    @staticmethod
    def forward(ctx, x: Tensor, w_in: Tensor, w_out: Tensor, counts_E: Tensor,  # type: ignore[override]
                scale_M: Tensor | None, plan: dispatch.DispatchPlan | None) -> Tensor:
        rows_M = None if plan is None else plan.token_index
        # with a plan: y is [T, D], each expert's output rows added into their tokens as they are made (combine)
        y, h_MX = kernels.cpu_kernels().experts_swiglu_forward(x, rows_M, counts_E, w_in, w_out, scale_M, True)
        ctx.plan = plan
        ctx.save_for_backward(x, h_MX, counts_E, w_in, w_out, scale_M)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x, h_MX, counts_E, w_in, w_out, scale_M = ctx.saved_tensors
        plan = ctx.plan
        need_x, need_w_in, need_w_out, _, need_scale, _ = ctx.needs_input_grad
        grad_x, grad_w_in, grad_w_out, grad_scale = kernels.cpu_kernels().experts_swiglu_backward(
            grad.contiguous(), x, None if plan is None else plan.token_index, h_MX, counts_E, w_in, w_out, scale_M,
            need_x, need_w_in or need_w_out, need_scale, True,
        )  # with a plan, grad_x is [T, D]: each token's slot rows summed in a fixed order (expert order)
        return (grad_x, grad_w_in if need_w_in else None, grad_w_out if need_w_out else None, None,
                grad_scale if need_scale else None, None)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    torch._grouped_mm's CPU backward rejects stride-0 (expanded) gradients such as the one `out.sum().backward()`
    produces ("Invalid strides/sizes"); this is the narrowest place to fix it.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return grad.contiguous()


def grouped_mm_available(x: Tensor, w: Tensor) -> bool:
    """Whether `torch._grouped_mm` can run x @ w[e] for this device and dtype in the installed torch."""
    if not hasattr(torch, "_grouped_mm") or x.dtype not in _GROUPED_MM_DTYPES or w.dtype != x.dtype:
        return False
    # The kernel wants every row stride to be a multiple of 16 bytes (e.g. widths divisible by 4 in float32).
    if any(size * x.element_size() % 16 for size in (x.shape[-1], w.shape[-2], w.shape[-1])):
        return False
    if x.device.type == "cpu":
        # The CPU kernel exists from torch 2.9 and wants 16-byte aligned operands.
        return _TORCH_VERSION >= (2, 9) and x.data_ptr() % 16 == 0 and w.data_ptr() % 16 == 0
    if x.device.type == "cuda":
        # torch 2.9+ runs it on SM80+; earlier releases only on Hopper (SM90).
        capability = torch.cuda.get_device_capability(x.device)
        return capability >= (8, 0) if _TORCH_VERSION >= (2, 9) else capability[0] == 9
    return False


class _SegmentMM(torch.autograd.Function):
    """x[segment e] @ w[e] for every non-empty segment, each product written in place into one output (and the
    same in backward): no concatenation, and idle experts cost nothing.

    On CPU this is the training path: torch's CPU `_grouped_mm` is itself a loop of matmuls, no faster in fwd+bwd
    (measured). In inference `grouped_mm` uses `_grouped_mm` (its loop is in C++; an idle expert's empty product
    reads none of its weights: 8 busy of 64 experts with 4 MB each, caches flushed, 3.4 ms vs this loop's 3.9).
    """

    @staticmethod
    def forward(ctx, x_MD: Tensor, w_EDF: Tensor, counts: list[int]) -> Tensor:  # type: ignore[override]
        out_MF = x_MD.new_empty(x_MD.shape[0], w_EDF.shape[-1])
        # One C++ call each makes every segment's view (slicing in the loop cost ~25 us per expert in Python).
        xs, outs, ws = x_MD.split(counts), out_MF.split(counts), w_EDF.unbind(0)
        for e, n in enumerate(counts):
            if n:
                torch.mm(xs[e], ws[e], out=outs[e])
        ctx.save_for_backward(x_MD, w_EDF)
        ctx.counts = counts
        return out_MF

    @staticmethod
    def backward(ctx, grad_MF: Tensor):  # type: ignore[override]
        x_MD, w_EDF = ctx.saved_tensors
        grad_MF = grad_MF.contiguous()
        counts = ctx.counts
        grad_x = torch.empty_like(x_MD) if ctx.needs_input_grad[0] else None
        grad_w = torch.empty_like(w_EDF) if ctx.needs_input_grad[1] else None
        gs, xs, ws = grad_MF.split(counts), x_MD.split(counts), w_EDF.unbind(0)
        gxs = grad_x.split(counts) if grad_x is not None else None
        gws = grad_w.unbind(0) if grad_w is not None else None
        for e, n in enumerate(counts):
            if not n:
                if gws is not None:
                    gws[e].zero_()
                continue
            if gxs is not None:
                torch.mm(gs[e], ws[e].t(), out=gxs[e])
            if gws is not None:
                torch.mm(xs[e].t(), gs[e], out=gws[e])
        return grad_x, grad_w, None


def grouped_mm(x_MD: Tensor, w_EDF: Tensor, counts_E: Tensor, offsets_E: Tensor, impl: str = "auto") -> Tensor:
    """Segment-wise matrix multiply: rows offsets[e-1]:offsets[e] of x times w[e].

    Args:
        x_MD: [M, D] rows grouped by expert.
        w_EDF: [E, D, F] stacked weights.
        counts_E: [E] int64 rows per expert.
        offsets_E: [E] int32 cumulative row counts (end offset of each expert's segment), on x's device.
        impl: "grouped_mm", "loop" or "auto": torch._grouped_mm on accelerators that support it; on CPU the
            segment loop where autograd is recording (fwd+bwd measured equal within noise) and torch._grouped_mm
            in inference (its C++ loop saves the Python loop's ~5-10 us per expert: 2-6% of the expert GEMMs at
            8-128 experts, bitwise the same results, measured).
    Returns:
        [M, F].
    """
    if impl not in EXPERT_IMPLS:
        raise ValueError(f"unknown expert_impl {impl!r}: expected one of {', '.join(map(repr, EXPERT_IMPLS))}")
    if x_MD.shape[0] == 0:  # no rows: keep the (empty) result connected to the graph
        return x_MD @ w_EDF[0]
    recording = torch.is_grad_enabled() and (x_MD.requires_grad or w_EDF.requires_grad)
    use_grouped = impl == "grouped_mm" or (impl == "auto" and (x_MD.device.type != "cpu" or not recording))
    if use_grouped and grouped_mm_available(x_MD, w_EDF):
        return _ContiguousGrad.apply(torch._grouped_mm(x_MD, w_EDF, offs=offsets_E))
    if impl == "grouped_mm":
        raise RuntimeError(
            f"expert_impl='grouped_mm' is not available for dtype {x_MD.dtype} on {x_MD.device} with torch "
            f"{torch.__version__}; use expert_impl='auto' or 'loop'"
        )
    return _SegmentMM.apply(x_MD.contiguous(), w_EDF, counts_E.tolist())


class Experts(nn.Module):
    """E independent FFN experts with stacked weights.

    Weights are stored in the layout the grouped multiply consumes directly: `w_in [E, D, F]` (`[E, D, 2F]` for
    gated activations: gate then up, fused into one multiply) and `w_out [E, F, D]`.

    Args:
        num_experts: E.
        d_model: D.
        d_ff: F, the hidden width of one expert (small for fine-grained experts).
        activation: one of swiglu, geglu, relu, gelu, silu, swiglu_oai.
        bias: add per-expert biases to both projections.
        impl: "auto", "grouped_mm" or "loop".
        swiglu_alpha, swiglu_limit: the constants of swiglu_oai (ignored by the other activations).
    """

    def __init__(
        self, num_experts: int, d_model: int, d_ff: int, activation: str = "swiglu", bias: bool = False,
        impl: str = "auto", swiglu_alpha: float = 1.702, swiglu_limit: float = 7.0,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}: expected one of {', '.join(map(repr, ACTIVATIONS))}")
        self.num_experts, self.d_model, self.d_ff = num_experts, d_model, d_ff
        self.activation, self.impl = activation, impl
        self.swiglu_alpha, self.swiglu_limit = swiglu_alpha, swiglu_limit
        width_in = 2 * d_ff if activation in GATED_ACTIVATIONS else d_ff
        self.w_in = nn.Parameter(torch.empty(num_experts, d_model, width_in))
        self.w_out = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.b_in = nn.Parameter(torch.zeros(num_experts, width_in)) if bias else None
        self.b_out = nn.Parameter(torch.zeros(num_experts, d_model)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Each expert is initialised like an nn.Linear of its own fan-in.
        nn.init.uniform_(self.w_in, -1 / math.sqrt(self.d_model), 1 / math.sqrt(self.d_model))
        nn.init.uniform_(self.w_out, -1 / math.sqrt(self.d_ff), 1 / math.sqrt(self.d_ff))

    def forward(self, x_MD: Tensor, counts_E: Tensor, scale_M: Tensor | None = None) -> Tensor:
        """Run each expert on its segment.

        Args:
            x_MD: [M, D] rows sorted so that expert e's rows are contiguous, in expert order.
            counts_E: [E] int64 rows per expert, summing to M.
            scale_M: optional [M] per-row output scale (the combine weights). It is applied to the hidden
                activations, before the (linear) down projection, where rows are narrower when F < D.
        Returns:
            [M, D] expert outputs (times scale_M), row-aligned with x.
        """
        if x_MD.shape[0] > 0:  # no rows: the grouped_mm path keeps the empty result connected to the graph
            fused = self._fused_call(x_MD, counts_E, scale_M, None)
            if fused is not None:
                return fused
        w_in, w_out = self.weights_as(x_MD.dtype)
        if scale_M is not None:
            scale_M = scale_M.to(x_MD.dtype)
        offsets_E = counts_E.cumsum(0).to(torch.int32)
        h_MX = grouped_mm(x_MD, w_in, counts_E, offsets_E, self.impl)
        if self.b_in is not None:
            h_MX = h_MX + self._segment_bias(self.b_in, counts_E, x_MD)
        if self.activation == "swiglu":
            h_MF = _ScaledSwiGLU.apply(h_MX, scale_M)
        else:
            h_MF = activate(h_MX, self.activation, self.swiglu_alpha, self.swiglu_limit)
            if scale_M is not None:
                h_MF = h_MF * scale_M.unsqueeze(1)
        y_MD = grouped_mm(h_MF, w_out, counts_E, offsets_E, self.impl)
        if self.b_out is not None:
            b_out_MD = self._segment_bias(self.b_out, counts_E, x_MD)
            y_MD = y_MD + (b_out_MD if scale_M is None else b_out_MD * scale_M.unsqueeze(1))
        return y_MD

    def forward_tokens(self, x_TD: Tensor, plan: dispatch.DispatchPlan) -> Tensor:
        """gather -> experts (times the plan's combine weights) -> combine: [T, D] -> [T, D]. One autograd node
        that never materialises the gathered rows where the fused C++ experts run, else the three steps."""
        if plan.token_index.numel():
            fused = self._fused_call(x_TD, plan.counts, plan.weights, plan)
            if fused is not None:
                return fused
        return dispatch.combine(self(dispatch.gather(x_TD, plan), plan.counts, plan.weights), plan)

    @property
    def plain_swiglu(self) -> bool:
        """SwiGLU without biases: the experts the fused C++ paths (training, decoding) compute."""
        return self.activation == "swiglu" and self.b_in is None and self.b_out is None

    def weights_as(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(w_in, w_out) in the activation dtype (autocast does not cover grouped_mm)."""
        if self.w_in.dtype == dtype:
            return self.w_in, self.w_out
        return self.w_in.to(dtype), self.w_out.to(dtype)

    def _fused_operands(self, x: Tensor, counts_E: Tensor,
                        scale_M: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor | None] | None:
        """(x, w_in, w_out, scale) as the one-call C++ experts (`_FusedSwiGLUExperts`) take them, or None where
        they do not take this call. They take plain SwiGLU without biases, the default or loop implementation, on
        CPU, kernels built: float32, and also bfloat16 where this CPU's bfloat16 GEMMs are emulated
        (`kernels.bf16_matmul_emulated`): the activations are then computed in float32 from the parameters as
        stored (bfloat16, or float32 under autocast; each bfloat16 expert converted in cache just before its
        products) and the output rounded to bfloat16 once: ~4x faster than bfloat16 GEMMs there, and no less
        precise."""
        if not (self.plain_swiglu and self.impl in ("auto", "loop") and counts_E.device.type == "cpu"):
            return None
        if x.dtype == torch.bfloat16 and x.device.type == "cpu" and kernels.bf16_matmul_emulated():
            if self.w_in.dtype not in (torch.float32, torch.bfloat16) or self.w_out.dtype != self.w_in.dtype:
                return None
            w_in, w_out, x_run = self.w_in, self.w_out, x.float()
        else:
            w_in, w_out = self.weights_as(x.dtype)
            x_run = x
        scale_run = None if scale_M is None else scale_M.to(x_run.dtype).contiguous()
        if not (w_in.is_contiguous() and w_out.is_contiguous() and w_in.device.type == "cpu"
                and kernels.usable(x_run, scale_run)):
            return None
        return x_run.contiguous(), w_in, w_out, scale_run

    def _fused_call(self, x: Tensor, counts_E: Tensor, scale_M: Tensor | None,
                    plan: dispatch.DispatchPlan | None) -> Tensor | None:
        """`_FusedSwiGLUExperts` on x (rows, or tokens with a plan) in x's dtype, or None (`_fused_operands`)."""
        operands = self._fused_operands(x, counts_E, scale_M)
        if operands is None:
            return None
        x_run, w_in, w_out, scale_run = operands
        return _FusedSwiGLUExperts.apply(x_run, w_in, w_out, counts_E, scale_run, plan).to(x.dtype)

    def _segment_bias(self, b_EX: Tensor, counts_E: Tensor, like: Tensor) -> Tensor:
        return b_EX.to(like.dtype).repeat_interleave(counts_E, dim=0, output_size=like.shape[0])

    def expert_forward(self, e: int, x_ND: Tensor, scale_N: Tensor | None = None) -> Tensor:
        """Expert `e` alone on rows x [N, D] (times scale_N, folded in as in `forward`): the reference
        implementation and the decode path use it."""
        w_in, w_out = self.w_in[e].to(x_ND.dtype), self.w_out[e].to(x_ND.dtype)
        h = x_ND @ w_in
        if self.b_in is not None:
            h = h + self.b_in[e].to(x_ND.dtype)
        if scale_N is not None:
            scale_N = scale_N.to(x_ND.dtype)
        if self.activation == "swiglu":
            a = _ScaledSwiGLU.apply(h, scale_N)
        else:
            a = activate(h, self.activation, self.swiglu_alpha, self.swiglu_limit)
            if scale_N is not None:
                a = a * scale_N.unsqueeze(1)
        y = a @ w_out
        if self.b_out is not None:
            b_out = self.b_out[e].to(x_ND.dtype)
            y = y + (b_out if scale_N is None else b_out * scale_N.unsqueeze(1))
        return y

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, d_model={self.d_model}, d_ff={self.d_ff}, activation={self.activation}"


class FFN(nn.Module):
    """A dense feed-forward block with the same activations as the experts (shared experts, dense baselines).

    Args:
        d_model: D.
        d_ff: hidden width.
        activation: one of swiglu, geglu, relu, gelu, silu, swiglu_oai.
        bias: biases in both projections.
        swiglu_alpha, swiglu_limit: the constants of swiglu_oai (ignored by the other activations).
    """

    def __init__(
        self, d_model: int, d_ff: int, activation: str = "swiglu", bias: bool = False,
        swiglu_alpha: float = 1.702, swiglu_limit: float = 7.0,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}: expected one of {', '.join(map(repr, ACTIVATIONS))}")
        self.activation = activation
        self.swiglu_alpha, self.swiglu_limit = swiglu_alpha, swiglu_limit
        width_in = 2 * d_ff if activation in GATED_ACTIVATIONS else d_ff
        self.w_in = nn.Linear(d_model, width_in, bias=bias)
        self.w_out = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        """x [..., D] -> [..., D]."""
        h = self.w_in(x)
        if self.activation == "swiglu":  # one autograd node (one C++ pass each way on float32 CPU)
            act = _ScaledSwiGLU.apply(h.reshape(-1, h.shape[-1]), None)
            return self.w_out(act.view(*h.shape[:-1], h.shape[-1] // 2))
        return self.w_out(activate(h, self.activation, self.swiglu_alpha, self.swiglu_limit))
