"""Experts: stacked per-expert FFNs run as grouped matrix multiplies over contiguous per-expert segments.

The specification is the plain per-expert loop: rows `offsets[e-1]:offsets[e]` of the input go through expert e
alone (`Experts.expert_forward`). Every implementation ("grouped_mm", "loop", "auto"), activation, dtype and
segment layout (empty experts, no rows at all) must agree with it, in the output and in the gradients.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moekit.config import ACTIVATIONS, GATED_ACTIVATIONS
from moekit.layers import FFN, Experts, grouped_mm

IMPLS = ("grouped_mm", "loop", "auto")

# D and F are multiples of 8 so that the grouped_mm kernel's 16-byte stride rule holds for float32 and bfloat16;
# the unaligned shapes have their own tests below.
E, D, FF = 4, 8, 8


def make_experts(activation="swiglu", bias=False, impl="auto", num_experts=E, d_model=D, d_ff=FF, seed=0):
    torch.manual_seed(seed)
    experts = Experts(num_experts, d_model, d_ff, activation, bias=bias, impl=impl)
    if bias:  # biases start at zero; make them matter
        with torch.no_grad():
            experts.b_in.normal_()
            experts.b_out.normal_()
    return experts


def loop_forward(experts: Experts, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The specification: each expert's segment through that expert alone, concatenated in expert order."""
    out = torch.zeros(x.shape[0], experts.d_model, dtype=x.dtype)
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n:
            out[start : start + n] = experts.expert_forward(e, x[start : start + n])
        start += n
    return out


def param_grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in module.named_parameters()}


COUNT_LAYOUTS = {
    "all_busy": [2, 3, 1, 4],
    "first_empty": [0, 3, 2, 5],
    "last_empty": [4, 3, 3, 0],
    "middle_empty": [3, 0, 0, 2],
    "one_expert_takes_all": [0, 0, 7, 0],
    "single_rows": [1, 1, 1, 1],
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_forward_equals_per_expert_loop(activation, bias, impl):
    experts = make_experts(activation, bias, impl)
    counts = torch.tensor(COUNT_LAYOUTS["first_empty"])
    x = torch.randn(int(counts.sum()), D)
    y = experts(x, counts)
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y, loop_forward(experts, x, counts), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", list(COUNT_LAYOUTS))
def test_empty_experts_are_skipped_and_rows_stay_aligned(layout, impl):
    experts = make_experts("swiglu", bias=True, impl=impl)
    counts = torch.tensor(COUNT_LAYOUTS[layout])
    x = torch.randn(int(counts.sum()), D)
    torch.testing.assert_close(experts(x, counts), loop_forward(experts, x, counts), atol=1e-5, rtol=1e-5)


def test_swiglu_is_silu_of_gate_times_up_then_down():
    experts = make_experts("swiglu", impl="auto")
    counts = torch.tensor([3, 0, 2, 1])
    x = torch.randn(6, D)
    expected, start = [], 0
    for e, n in enumerate(counts.tolist()):
        x_e = x[start : start + n]
        gate, up = experts.w_in[e, :, :FF], experts.w_in[e, :, FF:]  # stacked [D, 2F]: gate half, then up half
        expected.append((F.silu(x_e @ gate) * (x_e @ up)) @ experts.w_out[e])
        start += n
    torch.testing.assert_close(experts(x, counts), torch.cat(expected), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_weights_are_stacked_per_expert(activation):
    experts = make_experts(activation, bias=True)
    width = 2 * FF if activation in GATED_ACTIVATIONS else FF
    assert experts.w_in.shape == (E, D, width)
    assert experts.w_out.shape == (E, FF, D)
    assert experts.b_in.shape == (E, width) and experts.b_out.shape == (E, D)
    assert make_experts(activation, bias=False).b_in is None


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_zero_rows_give_an_empty_output_and_a_working_backward(bias, impl):
    experts = make_experts("swiglu", bias=bias, impl=impl)
    x = torch.randn(0, D, requires_grad=True)
    y = experts(x, torch.zeros(E, dtype=torch.long))
    assert y.shape == (0, D)
    y.sum().backward()  # an empty micro-batch must not break a training step
    assert x.grad is None or x.grad.shape == (0, D)
    for name, g in param_grads(experts).items():
        assert torch.count_nonzero(g) == 0, name


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_sum_backward_works_and_grads_match_loop_impl(activation, bias):
    # torch 2.13's CPU torch._grouped_mm backward rejects the stride-0 gradient that `.sum().backward()` produces;
    # Experts must hide that.
    counts = torch.tensor([0, 3, 2, 0])
    x = torch.randn(5, D)
    grads = {}
    for impl in ("grouped_mm", "loop"):
        experts = make_experts(activation, bias, impl)
        x_ = x.clone().requires_grad_()
        experts(x_, counts).sum().backward()
        grads[impl] = {"x": x_.grad, **param_grads(experts)}
    assert grads["grouped_mm"].keys() == grads["loop"].keys()
    for name in grads["loop"]:
        torch.testing.assert_close(grads["grouped_mm"][name], grads["loop"][name], atol=1e-5, rtol=1e-5, msg=name)
    # empty experts get exactly zero gradient
    for name in ("w_in", "w_out"):
        assert torch.count_nonzero(grads["grouped_mm"][name][[0, 3]]) == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_grouped_mm_function_is_a_segment_matmul_with_working_sum_backward(impl):
    torch.manual_seed(0)
    counts = torch.tensor([2, 0, 3, 1])
    offsets = counts.cumsum(0).to(torch.int32)
    x = torch.randn(6, 8, requires_grad=True)
    w = torch.randn(4, 8, 4, requires_grad=True)
    y = grouped_mm(x, w, counts, offsets, impl)
    expected = torch.cat([x[0:2] @ w[0], x[2:5] @ w[2], x[5:6] @ w[3]])
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    y.sum().backward()
    g_expected = torch.autograd.grad(expected.sum(), (x, w))
    torch.testing.assert_close(x.grad, g_expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.grad, g_expected[1], atol=1e-5, rtol=1e-5)


def test_auto_on_cpu_uses_grouped_mm_in_inference_and_the_loop_under_autograd(monkeypatch):
    torch.manual_seed(0)
    x, w = torch.randn(6, 8), torch.randn(3, 8, 4)
    calls = []
    real = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    for counts, grad, want in (([2, 3, 1], False, 1), ([3, 0, 3], False, 1), ([2, 3, 1], True, 0)):
        counts = torch.tensor(counts)
        offsets = counts.cumsum(0).to(torch.int32)
        calls.clear()
        with torch.set_grad_enabled(grad):
            y = grouped_mm(x.requires_grad_(grad), w, counts, offsets, "auto")
        assert len(calls) == want, (counts, grad)
        torch.testing.assert_close(y, grouped_mm(x, w, counts, offsets, "loop"), atol=0, rtol=0)  # same GEMMs


def test_grouped_mm_rejects_unknown_impl():
    with pytest.raises(ValueError, match="expert_impl"):
        offsets = torch.tensor([1, 2], dtype=torch.int32)
        grouped_mm(torch.randn(2, 8), torch.randn(2, 8, 4), torch.tensor([1, 1]), offsets, "fast")


def test_unknown_activation_is_rejected():
    with pytest.raises(ValueError, match="activation"):
        Experts(2, 8, 8, "tanh")
    with pytest.raises(ValueError, match="activation"):
        FFN(8, 8, "tanh")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_bfloat16_experts_match_float32_loop(activation, impl):
    experts = make_experts(activation, bias=True, impl=impl)
    counts = torch.tensor([3, 0, 4, 2])
    x = torch.randn(9, D)
    reference = loop_forward(experts, x, counts)
    experts_bf16 = experts.to(torch.bfloat16)
    x_bf16 = x.to(torch.bfloat16).requires_grad_()
    y = experts_bf16(x_bf16, counts)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), reference, atol=6e-2, rtol=5e-2)
    y.float().pow(2).sum().backward()
    assert torch.isfinite(x_bf16.grad.float()).all()
    assert experts_bf16.w_in.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("impl", IMPLS)
def test_bfloat16_input_runs_float32_weights_in_bfloat16(impl):
    # The autocast case: weights stay float32, activations arrive in bf16; experts compute in the activation dtype.
    experts = make_experts("swiglu", bias=True, impl=impl)
    counts = torch.tensor([2, 2, 0, 3])
    x = torch.randn(7, D)
    y = experts(x.to(torch.bfloat16), counts)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), loop_forward(experts, x, counts), atol=6e-2, rtol=5e-2)
    y.float().sum().backward()
    assert experts.w_in.grad.dtype == torch.float32 and torch.isfinite(experts.w_in.grad).all()


def test_float64_auto_falls_back_to_loop_and_matches():
    experts = make_experts("geglu", bias=True, impl="auto").double()
    counts = torch.tensor([0, 2, 3, 0])
    x = torch.randn(5, D, dtype=torch.float64)
    y = experts(x, counts)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, loop_forward(experts, x, counts), atol=1e-12, rtol=1e-12)


def test_float64_with_grouped_mm_impl_raises_a_clear_error():
    experts = make_experts("swiglu", impl="grouped_mm").double()
    with pytest.raises(RuntimeError, match="grouped_mm.*not available"):
        experts(torch.randn(3, D, dtype=torch.float64), torch.tensor([1, 1, 1, 0]))


def test_auto_falls_back_for_an_unaligned_input():
    # grouped_mm wants 16-byte aligned operands on CPU; a view at a 4-byte offset must still work under "auto".
    experts = make_experts("swiglu", impl="auto")
    counts = torch.tensor([1, 2, 0, 2])
    x = torch.randn(5 * D + 1)[1:].view(5, D)
    assert x.data_ptr() % 16 != 0
    torch.testing.assert_close(experts(x, counts), loop_forward(experts, x, counts), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("activation", ["swiglu", "relu"])
@pytest.mark.parametrize("d_model,d_ff", [(8, 4), (8, 1), (8, 2), (8, 3), (6, 4), (12, 6)])
def test_fine_grained_and_odd_widths_work_with_auto(d_model, d_ff, activation):
    # Fine-grained experts (DeepSeekMoE) have a small d_ff; "auto" must pick an implementation that works.
    experts = make_experts(activation, bias=True, impl="auto", d_model=d_model, d_ff=d_ff)
    counts = torch.tensor([3, 0, 2, 1])
    x = torch.randn(6, d_model, requires_grad=True)
    y = experts(x, counts)
    torch.testing.assert_close(y, loop_forward(experts, x.detach(), counts), atol=1e-5, rtol=1e-5)
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("d_model,d_ff", [(8, 4), (16, 4), (8, 8)])
def test_bfloat16_small_widths_work_with_auto(d_model, d_ff):
    experts = make_experts("swiglu", impl="auto", d_model=d_model, d_ff=d_ff)
    counts = torch.tensor([3, 0, 2, 1])
    x = torch.randn(6, d_model)
    reference = loop_forward(experts, x, counts)
    y = experts.to(torch.bfloat16)(x.to(torch.bfloat16).requires_grad_(), counts)
    torch.testing.assert_close(y.float(), reference, atol=6e-2, rtol=5e-2)
    y.float().sum().backward()


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck_loop_path_float64(activation):
    experts = make_experts(activation, bias=True, impl="loop", num_experts=3, d_model=3, d_ff=2).double()
    counts = torch.tensor([2, 0, 2])
    names = [n for n, _ in experts.named_parameters()]
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)

    def f(x, *params):
        return torch.func.functional_call(experts, dict(zip(names, params)), (x, counts))

    params = tuple(p.detach().clone().requires_grad_() for p in experts.parameters())
    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_ffn_is_one_dense_expert(activation, bias):
    torch.manual_seed(0)
    ffn = FFN(D, FF, activation, bias=bias)
    experts = Experts(1, D, FF, activation, bias=bias)
    with torch.no_grad():  # nn.Linear stores [out, in]; experts store [in, out]
        experts.w_in[0] = ffn.w_in.weight.t()
        experts.w_out[0] = ffn.w_out.weight.t()
        if bias:
            experts.b_in[0] = ffn.w_in.bias
            experts.b_out[0] = ffn.w_out.bias
    x = torch.randn(2, 3, D)
    y = ffn(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y.reshape(-1, D), experts(x.reshape(-1, D), torch.tensor([6])), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_row_scale_multiplies_each_rows_output_bias_included(activation, impl):
    # The combine weights may be applied inside the experts: y_m = s_m * expert(x_m), the output bias included.
    experts = make_experts(activation, bias=True, impl=impl)
    counts = torch.tensor([2, 0, 3, 1])
    x = torch.randn(6, D)
    scale = torch.rand(6)
    y = experts(x, counts, scale)
    torch.testing.assert_close(y, scale.unsqueeze(1) * loop_forward(experts, x, counts), atol=1e-5, rtol=1e-5)
