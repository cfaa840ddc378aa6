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
