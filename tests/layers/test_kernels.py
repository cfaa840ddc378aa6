"""moekit's fused C++ CPU kernels (layers/kernels) against plain PyTorch formulas and autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moekit.layers import kernels
from moekit.layers.attention import _RMSNorm, apply_rope
from moekit.layers.experts import _ScaledSwiGLU
from moekit.models.lm import cross_entropy


def _grads(fn, inputs, grad_out):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    grads = torch.autograd.grad(out, inputs, grad_out, allow_unused=True)
    return out, [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads)]


@pytest.mark.parametrize("rows,width", [(0, 8), (1, 5), (37, 19), (64, 16), (300, 130)])
@pytest.mark.parametrize("with_scale", [False, True])
def test_swiglu_kernel_equals_autograd_of_the_formula(fused_kernels, rows, width, with_scale):
    torch.manual_seed(rows + width)
    h = torch.randn(rows, 2 * width) * 3
    scale = torch.rand(rows) if with_scale else None
    g = torch.randn(rows, width)

    def plain(h, *s):
        gate, up = h.chunk(2, dim=-1)
        out = F.silu(gate) * up
        return out * s[0].unsqueeze(1) if s else out

    inputs = [h] + ([scale] if with_scale else [])
    ours, ours_grads = _grads(lambda h, *s: _ScaledSwiGLU.apply(h, s[0] if s else None), inputs, g)
    ref, ref_grads = _grads(plain, inputs, g)
    assert ours.grad_fn is not None and ours.shape == (rows, width)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)
    for a, b in zip(ours_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_swiglu_kernel_is_used_and_matches_the_pytorch_form(fused_kernels):
    torch.manual_seed(0)
    h, scale = torch.randn(50, 2 * 24), torch.rand(50)
    out = fused_kernels.swiglu_forward(h, scale)
    gate, up = h.chunk(2, dim=-1)
    torch.testing.assert_close(out, F.silu(gate) * up * scale[:, None], atol=1e-6, rtol=1e-6)
    with pytest.raises(RuntimeError, match="h must be"):
        fused_kernels.swiglu_forward(torch.randn(4, 5), None)  # odd width: no (gate, up) halves
    with pytest.raises(RuntimeError, match="float32"):
        fused_kernels.swiglu_forward(h.double(), None)


@pytest.mark.parametrize("shape", [(0, 16), (1, 7), (3, 17, 100), (2, 64, 256)])
def test_rmsnorm_kernel_equals_autograd_of_the_formula(fused_kernels, shape):
    torch.manual_seed(len(shape))
    x, w, g = torch.randn(shape) * 2, torch.randn(shape[-1]), torch.randn(shape)

    def plain(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    ours, ours_grads = _grads(lambda x, w: _RMSNorm.apply(x, w, 1e-6), [x, w], g)
    ref, ref_grads = _grads(plain, [x, w], g)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(ours_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_rmsnorm_kernel_weight_gradient_does_not_depend_on_the_thread_count(fused_kernels):
    torch.manual_seed(0)
    x, w, g, rstd = torch.randn(1000, 96), torch.randn(96), torch.randn(1000, 96), torch.rand(1000, 1)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(fused_kernels.rms_norm_backward(g, x, rstd, w, True, True))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0][1], results[1][1]) and torch.equal(results[0][0], results[1][0])


@pytest.mark.parametrize("heads_major", [False, True])
def test_rope_kernel_is_bitwise_the_pytorch_rotation_forward_and_backward(fused_kernels, no_kernels, heads_major):
    torch.manual_seed(0)
    qkv = torch.randn(2, 5, 7, 64)[..., :48]  # a strided view, as q/k are of a fused projection
    cos, sin = torch.randn(5, 48), torch.randn(5, 48)
    g = torch.randn(2, 5, 7, 48)
    ref, ref_grad = _grads(lambda q: apply_rope(q, cos, sin, heads_major=heads_major), [qkv], g)
    kernels._module = fused_kernels  # the fixture `no_kernels` restores the previous state afterwards
    ours, ours_grad = _grads(lambda q: apply_rope(q, cos, sin, heads_major=heads_major), [qkv], g)
    assert torch.equal(ours, ref) and ours.stride() == ref.stride()
    assert torch.equal(ours_grad[0], ref_grad[0])


@pytest.mark.parametrize("rows,vocab", [(5, 7), (64, 4096), (3, 33)])
def test_cross_entropy_kernel_equals_torch(fused_kernels, rows, vocab):
    torch.manual_seed(vocab)
    logits = torch.randn(rows, vocab) * 4
    targets = torch.randint(0, vocab, (rows,))
    targets[0] = -100  # ignored: counts for nothing
    ours, ours_grad = _grads(lambda x: cross_entropy(x, targets) * 3, [logits], torch.tensor(1.0))
    ref, ref_grad = _grads(lambda x: F.cross_entropy(x, targets, ignore_index=-100) * 3, [logits], torch.tensor(1.0))
    assert "CrossEntropy" in type(cross_entropy(logits.requires_grad_(), targets).grad_fn).__name__  # the kernel
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(ours_grad[0], ref_grad[0], atol=1e-7, rtol=1e-5)
    assert not ours_grad[0][0].any()
    ours1, ours1_grad = _grads(lambda x: cross_entropy(x, targets), [logits], torch.tensor(1.0))  # grad saved as is
    ref1, ref1_grad = _grads(lambda x: F.cross_entropy(x, targets, ignore_index=-100), [logits], torch.tensor(1.0))
    torch.testing.assert_close(ours1_grad[0], ref1_grad[0], atol=1e-7, rtol=1e-5)


def test_cross_entropy_kernel_edge_cases(fused_kernels):
    assert torch.isnan(cross_entropy(torch.randn(4, 9), torch.full((4,), -100)))  # as F.cross_entropy: 0 / 0
    with pytest.raises(RuntimeError, match="target 5 is out of range"):
        cross_entropy(torch.randn(3, 5), torch.tensor([0, 5, 1]))


def test_a_training_step_is_the_same_with_and_without_the_kernels(fused_kernels):
    from moekit.config import ModelConfig, MoEConfig
    from moekit.models.lm import MoELM

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, dense_d_ff=48,
                      moe=MoEConfig(d_model=32, num_experts=4, top_k=2, d_ff=24))  # fmt: skip
    model = MoELM(cfg)
    ids = torch.randint(0, 97, (2, 12))
    targets = ids.roll(-1, 1)
    targets[:, -1] = -100

    def step():
        model.zero_grad(set_to_none=True)
        out = model(ids, targets=targets)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_fused, grads_fused = step()
    saved = kernels._module, kernels._tried
    kernels._module, kernels._tried = None, True
    try:
        loss_plain, grads_plain = step()
    finally:
        kernels._module, kernels._tried = saved
    torch.testing.assert_close(loss_fused, loss_plain, atol=1e-6, rtol=1e-6)
    assert grads_fused.keys() == grads_plain.keys() and len(grads_fused) > 10
    for name in grads_fused:
        torch.testing.assert_close(grads_fused[name], grads_plain[name], atol=1e-5, rtol=1e-4, msg=name)


def test_a_failed_build_warns_once_and_falls_back(monkeypatch):
    saved = kernels._module, kernels._tried
    try:
        kernels.reset()

        def broken():
            raise RuntimeError("Error building extension\nmain.cpp:1: error: no compiler here\nninja: stopped")

        monkeypatch.setattr(kernels, "_build", broken)
        with pytest.warns(RuntimeWarning, match="no compiler here"):
            assert kernels.cpu_kernels() is None
        assert not kernels.usable(torch.ones(2))  # no second warning, PyTorch forms from now on
        h = torch.randn(3, 8)
        gate, up = h.chunk(2, dim=-1)
        torch.testing.assert_close(_ScaledSwiGLU.apply(h, None), F.silu(gate) * up)
        kernels.reset()
        monkeypatch.setenv("MOEKIT_KERNELS", "0")
        assert kernels.cpu_kernels() is None  # disabled: no build attempted, no warning
    finally:
        kernels._module, kernels._tried = saved


def test_non_float32_inputs_take_the_pytorch_forms(fused_kernels):
    assert not kernels.usable(torch.ones(2, dtype=torch.float64))
    assert not kernels.usable(torch.ones(2, dtype=torch.bfloat16))
    h = torch.randn(6, 10, dtype=torch.float64, requires_grad=True)
    s = torch.rand(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda h, s: _ScaledSwiGLU.apply(h, s), (h, s))


def test_a_stale_build_lock_is_removed_instead_of_waited_on(fused_kernels):
    import os
    import time

    build_dir = kernels._extension()[1]
    lock = build_dir / "lock"  # what a build killed mid-way leaves behind
    lock.touch()
    old = time.time() - 2 * kernels._STALE_LOCK_SECONDS
    os.utime(lock, (old, old))
    with pytest.warns(RuntimeWarning, match="stale kernel build lock"):
        module = kernels._build()
    assert not lock.exists() and module.__name__ == fused_kernels.__name__


def test_dense_ffn_swiglu_takes_empty_and_batched_inputs(fused_kernels):
    from moekit.layers.experts import FFN

    torch.manual_seed(0)
    ffn = FFN(8, 6)
    assert ffn(torch.randn(0, 8)).shape == (0, 8) and ffn(torch.randn(2, 0, 8)).shape == (2, 0, 8)
    x = torch.randn(3, 4, 8)
    gate, up = ffn.w_in(x).chunk(2, dim=-1)
    torch.testing.assert_close(ffn(x), ffn.w_out(F.silu(gate) * up), atol=1e-6, rtol=1e-5)


def _decode_reference(x, idx, w, w_in, w_out):
    """The decode kernel's formula in float64: per slot w * (silu(x W_gate) * (x W_up)) W_out, summed per token."""
    x, w_in, w_out = x.double(), w_in.double(), w_out.double()
    F_ = w_out.shape[1]
    y = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(idx.shape[0]):
        for k in range(idx.shape[1]):
            e = int(idx[t, k])
            if e >= 0:
                h = x[t] @ w_in[e]
                y[t] += float(w[t, k]) * ((F.silu(h[:F_]) * h[F_:]) @ w_out[e])
    return y


@pytest.mark.parametrize(
    "T,K,E,D,Fh", [(1, 8, 64, 64, 32), (5, 2, 4, 17, 9), (16, 4, 8, 48, 40), (3, 1, 3, 7, 3), (1, 1, 4, 300, 260)]
)  # the last: one expert, its columns split among the threads
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_decode_kernel_equals_the_formula(fused_kernels, T, K, E, D, Fh, dtype):
    torch.manual_seed(T * 100 + D)
    x = torch.randn(T, D).to(dtype)
    w_in, w_out = (torch.randn(E, D, 2 * Fh) / D**0.5).to(dtype), (torch.randn(E, Fh, D) / Fh**0.5).to(dtype)
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(T)])  # tokens share experts when T * K > E
    idx[0, -1] = -1  # an empty slot (a padding token's, or a masked one) is skipped
    w = torch.rand(T, K)
    y, counts = fused_kernels.moe_decode(x, idx, w, w_in, w_out)
    ref = _decode_reference(x, idx, w, w_in, w_out)
    assert y.dtype == dtype and y.shape == (T, D)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)  # bf16: output rounding
    torch.testing.assert_close(y.double(), ref, **tol)
    assert torch.equal(counts, torch.bincount(idx[idx >= 0], minlength=E))


@pytest.mark.parametrize("T,K", [(8, 4), (1, 1), (1, 2)])  # (1, 1/2): one or two experts, columns split by threads
def test_moe_decode_kernel_is_bitwise_the_same_at_any_thread_count(fused_kernels, T, K):
    torch.manual_seed(0)
    x, idx, w = torch.randn(T, 256), torch.randint(0, 16, (T, K)), torch.rand(T, K)
    w_in, w_out = torch.randn(16, 256, 2 * 320), torch.randn(16, 320, 256)
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(fused_kernels.moe_decode(x, idx, w, w_in, w_out)[0])
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_moe_decode_kernel_rejects_bad_input(fused_kernels):
    x, idx, w = torch.randn(2, 8), torch.zeros(2, 2, dtype=torch.long), torch.rand(2, 2)
    w_in, w_out = torch.randn(4, 8, 6), torch.randn(4, 3, 8)
    with pytest.raises(RuntimeError, match="expert index 4 out of range for 4 experts"):
        fused_kernels.moe_decode(x, idx.fill_(4), w, w_in, w_out)
    with pytest.raises(RuntimeError, match="do not fit"):
        fused_kernels.moe_decode(x, idx.zero_(), w, w_in, torch.randn(4, 3, 9))
    with pytest.raises(RuntimeError, match="one dtype"):
        fused_kernels.moe_decode(x.bfloat16(), idx, w, w_in, w_out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_inference_with_few_tokens_takes_the_decode_kernel(fused_kernels, monkeypatch, dtype):
    from moekit import MoE, MoEConfig

    torch.manual_seed(0)
    moe = MoE(MoEConfig(d_model=32, d_ff=24, num_experts=8, top_k=2)).to(dtype)
    x = torch.randn(2, 5, 32).to(dtype)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    calls = []
    real = kernels._module.moe_decode
    monkeypatch.setattr(kernels._module, "moe_decode", lambda *a: calls.append(1) or real(*a), raising=False)
    y_grad = moe(x, mask=mask)  # autograd on: the dispatch path
    stats_grad = moe.last
    with torch.no_grad():
        y = moe(x, mask=mask)
    assert calls == [1]
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(y, y_grad.detach(), **tol)
    assert torch.equal(moe.last.tokens_per_expert, stats_grad.tokens_per_expert)
    torch.testing.assert_close(moe.last.entropy, stats_grad.entropy)


@pytest.mark.parametrize("E,D,Fh,M", [(4, 16, 12, 30), (5, 8, 3, 7), (16, 64, 40, 500), (1, 24, 17, 9)])
@pytest.mark.parametrize("with_scale", [False, True])
def test_fused_swiglu_experts_equal_the_pytorch_path(fused_kernels, no_kernels, E, D, Fh, M, with_scale):
    from moekit.layers.experts import Experts

    torch.manual_seed(E * M)
    ex = Experts(E, D, Fh)
    x, g = torch.randn(M, D), torch.randn(M, D)
    scale = torch.rand(M) if with_scale else None
    counts = torch.bincount(torch.randint(0, max(E - 1, 1), (M,)), minlength=E)  # the last expert idle (E > 1)
    inputs = [x] + ([scale] if with_scale else [])

    def run():
        leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
        out = ex(leaves[0], counts, leaves[1] if with_scale else None)
        return out, list(torch.autograd.grad(out, leaves + [ex.w_in, ex.w_out], g))

    ref, ref_grads = run()  # the PyTorch path (fixture `no_kernels`): segment GEMMs + the SwiGLU node
    kernels._module = fused_kernels  # the fixture restores the previous state afterwards
    assert ex._fused_operands(x, counts, scale) is not None
    ours, ours_grads = run()
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)
    for a, b in zip(ours_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    if E > 1:
        assert not ours_grads[-1][-1].any() and not ours_grads[-2][-1].any()  # the idle expert: zero gradients


def test_fused_experts_kernel_takes_bf16_weights_as_float32(fused_kernels):
    """bfloat16 weights are converted to float32 exactly, so the kernel's results equal those of the float32 copies
    bit for bit; the weight gradients are those results rounded to bfloat16 once."""
    torch.manual_seed(1)
    T, D, E, F = 40, 24, 4, 12
    x, g = torch.randn(T, D), torch.randn(T, D)
    w_in, w_out = torch.randn(E, D, 2 * F).bfloat16(), torch.randn(E, F, D).bfloat16()
    counts, rows, scale = torch.tensor([10, 0, 20, 14]), torch.randint(0, T, (44,)), torch.rand(44)
    for combine in (False, True):
        y16, h16 = fused_kernels.experts_swiglu_forward(x, rows, counts, w_in, w_out, scale, combine)
        y32, h32 = fused_kernels.experts_swiglu_forward(x, rows, counts, w_in.float(), w_out.float(), scale, combine)
        assert y16.dtype == torch.float32 and torch.equal(y16, y32) and torch.equal(h16, h32)
        grad_y = g  # with rows, the gradient is per token either way
        got = fused_kernels.experts_swiglu_backward(grad_y, x, rows, h16, counts, w_in, w_out, scale, True, True, True,
                                                    combine)
        want = fused_kernels.experts_swiglu_backward(grad_y, x, rows, h32, counts, w_in.float(), w_out.float(), scale,
                                                     True, True, True, combine)
        assert [t.dtype for t in got] == [torch.float32, torch.bfloat16, torch.bfloat16, torch.float32]
        for a, b in zip(got, want):
            assert torch.equal(a, b.to(a.dtype))
        assert not got[1][1].any() and not got[2][1].any()  # the idle expert
    with pytest.raises(RuntimeError, match="w_in is BFloat16 but w_out is Float"):
        fused_kernels.experts_swiglu_forward(x, rows, counts, w_in, w_out.float(), scale, True)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        fused_kernels.experts_swiglu_forward(x, rows, counts, w_in.half(), w_out.half(), scale, True)


@pytest.mark.parametrize("params", ["bfloat16", "float32-autocast"])
def test_bf16_experts_take_the_float32_kernel_where_bf16_gemms_are_emulated(fused_kernels, monkeypatch, params):
    """On a CPU without bfloat16 matrix instructions the fused experts compute bfloat16 activations in float32 from
    the stored parameters: the result is bfloat16 and matches the float64 formula on the same inputs within
    bfloat16's rounding of the output, gradients come back in the parameters' dtype, and the MoE layer's dispatch
    path takes it. Where the CPU has bfloat16 GEMMs the PyTorch path keeps them."""
    from moekit import MoE, MoEConfig
    from moekit.layers.experts import Experts

    monkeypatch.setattr(kernels, "_bf16_emulated", True)
    calls = []
    real = fused_kernels.experts_swiglu_forward
    monkeypatch.setattr(kernels._module, "experts_swiglu_forward", lambda *a: calls.append(a[3].dtype) or real(*a),
                        raising=False)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=params != "bfloat16")
    torch.manual_seed(2)
    ex = Experts(4, 32, 24)
    if params == "bfloat16":
        ex = ex.to(torch.bfloat16)
    counts = torch.tensor([9, 0, 14, 7])
    x, scale = torch.randn(30, 32).bfloat16().requires_grad_(True), torch.rand(30)
    with autocast:
        y = ex(x, counts, scale)
    assert calls == [ex.w_in.dtype] and y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert ex.w_in.grad.dtype == ex.w_in.dtype and x.grad.dtype == torch.bfloat16 and not ex.w_in.grad[1].any()
    x64, w_in, w_out = x.detach().double(), ex.w_in.detach().double(), ex.w_out.detach().double()
    expert_of_row = torch.repeat_interleave(torch.arange(4), counts)
    want = torch.stack([
        scale[m].double() * (torch.nn.functional.silu(x64[m] @ w_in[e, :, :24]) * (x64[m] @ w_in[e, :, 24:])) @ w_out[e]
        for m, e in enumerate(expert_of_row.tolist())
    ])
    torch.testing.assert_close(y.detach().double(), want, atol=1e-2, rtol=8e-3)  # bf16 output rounding

    torch.manual_seed(3)
    moe = MoE(MoEConfig(d_model=32, d_ff=24, num_experts=8, top_k=2))
    if params == "bfloat16":
        moe = moe.to(torch.bfloat16)
    xs = torch.randn(3, 20, 32).bfloat16()
    calls.clear()
    with autocast:
        y_fused = moe(xs)
    assert calls == [moe.experts.w_in.dtype] and y_fused.dtype == torch.bfloat16
    monkeypatch.setattr(kernels, "_bf16_emulated", False)
    calls.clear()
    with autocast:
        y_torch = moe(xs)
    assert calls == []  # native bfloat16 GEMMs: the PyTorch path, rounding the hidden activations to bfloat16
    torch.testing.assert_close(y_fused.float(), y_torch.float(), atol=3e-2, rtol=3e-2)


def test_fused_swiglu_experts_with_frozen_weights_or_input(fused_kernels):
    from moekit.layers.experts import Experts

    torch.manual_seed(0)
    ex = Experts(4, 16, 8)
    counts = torch.tensor([3, 0, 5, 2])
    x = torch.randn(10, 16, requires_grad=True)
    ex.requires_grad_(False)
    ex(x, counts).sum().backward()  # only the input's gradient asked for (expanded grad: sum's backward)
    assert x.grad is not None and ex.w_in.grad is None
    ex.requires_grad_(True)
    x2 = torch.randn(10, 16)
    ex(x2, counts).square().sum().backward()  # only the weights'
    assert ex.w_in.grad is not None and ex.w_out.grad is not None


def test_fused_swiglu_experts_reject_bad_counts(fused_kernels):
    x, w_in, w_out = torch.randn(5, 8), torch.randn(3, 8, 6), torch.randn(3, 3, 8)
    with pytest.raises(RuntimeError, match="counts sum to 4, x has 5 rows"):
        fused_kernels.experts_swiglu_forward(x, None, torch.tensor([1, 1, 2]), w_in, w_out, None, False)
    with pytest.raises(RuntimeError, match="do not fit"):
        fused_kernels.experts_swiglu_forward(x, None, torch.tensor([1, 2, 2]), w_in, torch.randn(3, 4, 8), None, False)
    with pytest.raises(RuntimeError, match="row index 5 out of range for 5 rows"):
        rows = torch.tensor([0, 5, 1])
        fused_kernels.experts_swiglu_forward(x, rows, torch.tensor([1, 1, 1]), w_in, w_out, None, True)


@pytest.mark.parametrize("router", ["topk", "expert_choice", "noisy_topk"])
def test_moe_gather_experts_combine_node_equals_the_three_steps(fused_kernels, router):
    from moekit import MoE, MoEConfig
    from moekit.layers import dispatch

    torch.manual_seed(0)
    moe = MoE(MoEConfig(d_model=32, d_ff=24, num_experts=8, top_k=2, router=router, capacity_factor=None
                        if router != "expert_choice" else 1.0))
    x, g = torch.randn(3, 7, 32), torch.randn(3, 7, 32)
    torch.manual_seed(1)
    out, grads = _grads(lambda x: moe(x), [x], g)
    w_grads = torch.autograd.grad(moe(x.requires_grad_(True)), [moe.experts.w_in, moe.experts.w_out], g)
    calls = []
    real = moe.experts.forward_tokens
    moe.experts.forward_tokens = lambda x_TD, plan: calls.append(1) or dispatch.combine(
        moe.experts(dispatch.gather(x_TD, plan), plan.counts, plan.weights), plan)  # the three separate steps
    try:
        torch.manual_seed(1)
        ref, ref_grads = _grads(lambda x: moe(x), [x], g)
        ref_w = torch.autograd.grad(moe(x), [moe.experts.w_in, moe.experts.w_out], g)
    finally:
        moe.experts.forward_tokens = real
    assert calls
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grads[0], ref_grads[0], atol=1e-5, rtol=1e-5)
    for a, b in zip(w_grads, ref_w):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_a_library_that_does_not_load_is_rebuilt_once(monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    name = "moekit_cpu_kernels_test"
    (tmp_path / f"{name}.so").write_bytes(b"\x7fELF truncated")  # what a build killed while linking leaves
    monkeypatch.setattr(kernels, "_extension", lambda: (name, tmp_path, b"// source", [], []))
    calls = []

    def fake_load(**kwargs):
        calls.append(sorted(p.name for p in tmp_path.glob("*.so")))
        if len(calls) == 1:
            raise ImportError(f"{tmp_path}/{name}.so: file too short")
        return "module"

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    with pytest.warns(RuntimeWarning, match="did not load"):
        assert kernels._build() == "module"
    assert calls == [[f"{name}.so"], []]  # the bad library deleted before the second (building) load


@pytest.fixture
def attention_routing_as_here(monkeypatch):
    """The attention kernel's routing as on this 2-core machine, whatever the test machine's thread count (it
    leaves chunks with fewer key/value groups than half the threads to SDPA)."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)


def _attention_reference(q, k, v, scale):
    """Causal GQA attention in float64 by the formula (query head h reads key/value head h // (H / G))."""
    H, G, S = q.shape[1], k.shape[1], q.shape[2]
    k, v = k.double().repeat_interleave(H // G, dim=1), v.double().repeat_interleave(H // G, dim=1)
    scores = q.double() @ k.transpose(-1, -2) * scale
    scores = scores.masked_fill(~torch.ones(S, S, dtype=torch.bool).tril(), float("-inf"))
    return scores.softmax(-1) @ v


@pytest.mark.parametrize(
    "B,H,G,S,X,Y",
    [(1, 1, 1, 2, 1, 1), (2, 4, 2, 5, 16, 16), (1, 3, 1, 70, 8, 8), (2, 2, 2, 129, 24, 24), (3, 4, 2, 64, 64, 64),
     (2, 4, 2, 33, 24, 16), (1, 2, 2, 70, 12, 20), (1, 2, 1, 9, 8, 3)],  # the last three: values of another width (MLA)
)
def test_causal_attention_kernel_equals_the_formula(attention_routing_as_here, fused_kernels, B, H, G, S, X, Y):
    from moekit.layers.attention import causal_attention

    torch.manual_seed(S + X + Y)
    q, k, g = torch.randn(B, H, S, X) * 2, torch.randn(B, G, S, X) * 2, torch.randn(B, H, S, Y)
    v = torch.randn(B, G, S, Y)
    scale = 0.7 / X**0.5
    ours, ours_grads = _grads(lambda q, k, v: causal_attention(q, k, v, scale), [q, k, v], g)
    ref, ref_grads = _grads(lambda q, k, v: _attention_reference(q, k, v, scale), [q.double(), k.double(), v.double()],
                            g.double())
    assert ours.grad_fn is not None and "CausalAttention" in type(ours.grad_fn).__name__
    torch.testing.assert_close(ours.double(), ref, atol=2e-6, rtol=1e-5)
    for a, b in zip(ours_grads, ref_grads):
        torch.testing.assert_close(a.double(), b, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("Y", [5, 8, 12])
def test_causal_attention_of_values_of_another_width_equals_the_formula_on_the_sdpa_path_too(Y):
    from moekit.layers.attention import causal_attention

    torch.manual_seed(Y)
    q, k = torch.randn(2, 4, 11, 8, dtype=torch.float64), torch.randn(2, 2, 11, 8, dtype=torch.float64)
    v, g = torch.randn(2, 2, 11, Y, dtype=torch.float64), torch.randn(2, 4, 11, Y, dtype=torch.float64)
    ours, ours_grads = _grads(lambda q, k, v: causal_attention(q, k, v, 0.3), [q, k, v], g)  # float64: SDPA
    ref, ref_grads = _grads(lambda q, k, v: _attention_reference(q, k, v, 0.3), [q, k, v], g)
    assert ours.shape == (2, 4, 11, Y)
    torch.testing.assert_close(ours, ref)
    for a, b in zip(ours_grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_causal_attention_kernel_takes_the_fused_projection_layout_and_matches_sdpa(
    attention_routing_as_here, fused_kernels
):
    """q/k as strided views of one heads-major [B, H+G, S, X] buffer (what Attention passes), v its own tensor."""
    from moekit.layers.attention import causal_attention

    torch.manual_seed(0)
    B, H, G, S, X = 2, 4, 2, 40, 32
    qk = torch.randn(B, H + G, S, X)
    q, k, v = qk[:, :H], qk[:, H:], torch.randn(B, G, S, X)
    assert not q.is_contiguous() and q.stride(2) == X
    g = torch.randn(B, H, S, X)
    ours, ours_grads = _grads(causal_attention, [q, k, v], g)
    sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # noqa: E731
    ref, ref_grads = _grads(sdpa, [q, k, v], g)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(ours_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_causal_attention_kernel_is_bitwise_the_same_at_any_thread_count(fused_kernels):
    torch.manual_seed(0)
    q, g = torch.randn(3, 4, 37, 16), torch.randn(3, 4, 37, 16)
    k, v = torch.randn(3, 2, 37, 16), torch.randn(3, 2, 37, 16)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            out, p = fused_kernels.causal_attention_forward(q, k, v, 0.25)
            results.append([out, p[..., :1], *fused_kernels.causal_attention_backward(g, q, k, v, out, p, 0.25)])
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_causal_attention_routes_long_chunks_and_other_dtypes_to_sdpa(
    attention_routing_as_here, fused_kernels, monkeypatch
):
    from moekit.layers import attention

    calls = []
    monkeypatch.setattr(attention._CausalAttention, "apply", lambda *a: calls.append(a) or torch.zeros(()))
    q, k = torch.randn(1, 2, attention.ATTENTION_KERNEL_MAX_SEQ + 1, 8), torch.randn(1, 1, 8, 8)
    attention.causal_attention(q, q[:, :1], q[:, :1])  # longer than the kernel takes
    q_train = torch.randn(1, 1, attention.ATTENTION_KERNEL_MAX_TRAIN_SEQ + 1, 8, requires_grad=True)
    attention.causal_attention(q_train, q_train, q_train)  # longer than it takes where the gradient is needed
    attention.causal_attention(k.double(), k.double(), k.double())  # float64
    attention.causal_attention(k[:, :, :1], k[:, :, :1], k[:, :, :1])  # one token: nothing to mask
    attention.causal_attention(k, k, k, scale=-1.0)
    with monkeypatch.context() as m:  # probabilities over the memory cap: B*H*S*S*4 = 256 bytes here
        m.setattr(attention, "ATTENTION_KERNEL_MAX_PROBS_BYTES", 255)
        attention.causal_attention(k, k, k)
    with monkeypatch.context() as m:  # one key/value group on a machine with 3+ threads: SDPA splits the queries
        m.setattr(torch, "get_num_threads", lambda: 3)  # (the fixture's 2 is restored after the block)
        attention.causal_attention(k, k, k)
    assert not calls
    attention.causal_attention(k, k, k)
    with torch.no_grad():
        attention.causal_attention(q_train, q_train, q_train)  # no gradient: up to ATTENTION_KERNEL_MAX_SEQ
    assert len(calls) == 2


def test_causal_attention_rejects_bad_shapes(fused_kernels):
    from moekit.layers.attention import causal_attention

    q = torch.randn(1, 4, 6, 8)
    with pytest.raises(ValueError, match=r"k \(1, 3, 6, 8\) and v \(1, 3, 6, 8\) do not fit q \(1, 4, 6, 8\)"):
        causal_attention(q, torch.randn(1, 3, 6, 8), torch.randn(1, 3, 6, 8))  # 3 does not divide 4
    with pytest.raises(ValueError, match="do not fit"):
        causal_attention(q, torch.randn(1, 2, 6, 8), torch.randn(1, 2, 5, 8))
    with pytest.raises(ValueError, match="do not fit"):
        causal_attention(q, torch.randn(1, 2, 6, 8), torch.randn(1, 1, 6, 8))  # v's groups are not k's
    with pytest.raises(RuntimeError, match="do not fit"):
        fused_kernels.causal_attention_forward(q, q[:, :2], q[:, :1], 1.0)
    with pytest.raises(RuntimeError, match="contiguous"):
        fused_kernels.causal_attention_forward(q.transpose(2, 3), q.transpose(2, 3), q.transpose(2, 3), 1.0)
    with pytest.raises(RuntimeError, match="scale must be positive, got 0"):
        fused_kernels.causal_attention_forward(q, q, q, 0.0)


@pytest.mark.parametrize("kwargs", [dict(), dict(qk_norm="head", scale=0.05), dict(qkv_bias=True, clip_qkv=1.5)])
def test_attention_module_kernel_path_equals_the_pytorch_path(
    attention_routing_as_here, fused_kernels, no_kernels, kwargs
):
    """Attention's fused RoPE + causal attention node (one gradient tensor for the fused projection) against RoPE
    and SDPA in PyTorch ops: output and the gradients of the input and of every weight."""
    from moekit.layers import attention

    torch.manual_seed(0)
    module = attention.Attention(48, 4, 2, 12, **kwargs)
    cos, sin = attention.rope_tables(40, 12, 10000.0)
    x, g = torch.randn(3, 40, 48), torch.randn(3, 40, 48)

    def run():
        module.zero_grad()
        xi = x.clone().requires_grad_(True)
        out = module(xi, cos[:40], sin[:40])
        out.backward(g)
        return out.grad_fn, out, [xi.grad] + [p.grad.clone() for p in module.parameters()]

    _, ref, ref_grads = run()  # the PyTorch path (fixture `no_kernels`)
    kernels._module = fused_kernels  # the fixture restores the previous state afterwards
    nodes = []
    original = attention._RopeCausalAttention.apply
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(attention._RopeCausalAttention, "apply", lambda *a: nodes.append(1) or original(*a))
        _, ours, ours_grads = run()
    assert nodes == [1]
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(ours_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_fused_experts_combine_sums_each_tokens_rows_even_when_listed_twice(fused_kernels):
    """combine=True adds each expert's output rows (and in backward the input-gradient rows) into their tokens;
    equal to the per-slot rows summed with index_add, also for a token listed twice in one expert's segment."""
    torch.manual_seed(0)
    T, D, E, Fh = 7, 40, 3, 24
    x, w_in, w_out = torch.randn(T, D), torch.randn(E, D, 2 * Fh) / 6, torch.randn(E, Fh, D) / 5
    rows = torch.tensor([0, 3, 3, 6, 1, 2, 0, 5, 4, 4])  # expert 0: 0, 3, 3 (twice), 6; expert 1: 1, 2; expert 2: ...
    counts, scale = torch.tensor([4, 2, 4]), torch.rand(10)
    y_T, h = fused_kernels.experts_swiglu_forward(x, rows, counts, w_in, w_out, scale, True)
    y_M, h_M = fused_kernels.experts_swiglu_forward(x, rows, counts, w_in, w_out, scale, False)
    assert y_T.shape == (T, D) and y_M.shape == (10, D) and torch.equal(h, h_M)
    torch.testing.assert_close(y_T, torch.zeros(T, D).index_add_(0, rows, y_M), atol=1e-6, rtol=1e-6)
    g_T = torch.randn(T, D)
    fused = fused_kernels.experts_swiglu_backward(g_T, x, rows, h, counts, w_in, w_out, scale, True, True, True, True)
    plain = fused_kernels.experts_swiglu_backward(g_T, x, rows, h, counts, w_in, w_out, scale, True, True, True, False)
    assert fused[0].shape == (T, D) and plain[0].shape == (10, D)
    torch.testing.assert_close(fused[0], torch.zeros(T, D).index_add_(0, rows, plain[0]), atol=1e-6, rtol=1e-6)
    for a, b in zip(fused[1:], plain[1:]):
        assert torch.equal(a, b)
