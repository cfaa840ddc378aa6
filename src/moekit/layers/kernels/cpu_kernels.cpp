// moekit's fused CPU kernels: float32, contiguous, one pass over memory where PyTorch's eager ops take several.
//
// Built on first use by moekit/layers/kernels/__init__.py with torch.utils.cpp_extension (JIT, cached), with
// CPU_CAPABILITY set to the vector ISA torch itself dispatches to on this CPU, so at::vec::Vectorized<float>::exp is
// the same routine torch's own sigmoid/silu kernels use. The callers check dtype/device/contiguity and fall back to
// PyTorch ops otherwise; each kernel is tested against that fallback (tests/layers/test_kernels.py).
//
// Legend: M/N rows, F hidden width of a gated activation (input has 2F columns: gate then up), D normalised width.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/cpu/vec/functional.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

using Vec = at::vec::Vectorized<float>;

namespace {

constexpr int64_t kGrainElements = 32768;  // rows per parallel task: about this many elements

int64_t grain_rows(int64_t width) { return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(width, 1)); }

void check_float_contiguous(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(), "moekit kernel: ", name,
              " must be a contiguous float32 CPU tensor, got ", t.scalar_type(), " on ", t.device(),
              t.is_contiguous() ? "" : " (not contiguous)");
}

// The lanes of a vector of partial sums, added in double.
inline double lane_sum(const Vec& v) {
  float lanes[Vec::size()];
  v.store(lanes);
  double s = 0.0;
  for (int64_t l = 0; l < Vec::size(); ++l) s += lanes[l];
  return s;
}

// Sum over a row of a[i] * b[i], vectorised with float lanes, then the lanes summed in double.
inline float dot(const float* a, const float* b, int64_t n) {
  Vec acc(0.f);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) acc = acc + Vec::loadu(a + i) * Vec::loadu(b + i);
  double s = lane_sum(acc);
  for (; i < n; ++i) s += static_cast<double>(a[i]) * b[i];
  return static_cast<float>(s);
}

// The data of an optional per-row scale of M values (nullptr when absent).
const float* scale_data(const c10::optional<torch::Tensor>& scale, int64_t M) {
  if (!scale.has_value()) return nullptr;
  check_float_contiguous(*scale, "scale");
  TORCH_CHECK(scale->numel() == M, "moekit swiglu: scale must have M = ", M, " values, got ", scale->numel());
  return scale->data_ptr<float>();
}

}  // namespace

// Row loops below step by whole vectors; loadu(p, n) / store(p, n) take the last partial one (at::vec's counted
// load fills the lanes past n with zeros, so they add nothing to a sum).

// out[m, f] = silu(h[m, f]) * h[m, F + f] (* scale[m]) for rows m < M: the rounding of
// F.silu(gate).mul_(up).mul_(scale). ps may be nullptr (no scale).
void swiglu_rows(const float* ph, const float* ps, float* po, int64_t M, int64_t F) {
  const Vec one(1.f);
  at::parallel_for(0, M, grain_rows(2 * F), [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const float* g = ph + m * 2 * F;
      const float* u = g + F;
      float* o = po + m * F;
      const Vec s(ps ? ps[m] : 1.f);
      for (int64_t i = 0; i < F; i += Vec::size()) {
        const int64_t n = std::min<int64_t>(Vec::size(), F - i);
        Vec gv = Vec::loadu(g + i, n);
        Vec r = gv / (one + gv.neg().exp()) * Vec::loadu(u + i, n);
        if (ps) r = r * s;
        r.store(o + i, n);
      }
    }
  });
}

// The backward of swiglu_rows: grad_h [M, 2F] (gate half, up half), if pgs is given grad_scale [M], and if pa is
// given the forward's output again, act * u * s [M, F] (the experts' backward needs it for w_out's gradient).
//   sig = sigmoid(g), act = g * sig, dsilu = (g - act + 1) * sig
//   grad_up = grad * act * s; grad_gate = grad * s * u * dsilu; grad_scale = sum_f grad * act * u
void swiglu_backward_rows(const float* pg, const float* ph, const float* ps, float* pgh, float* pgs, int64_t M,
                          int64_t F, float* pa = nullptr) {
  const Vec one(1.f);
  at::parallel_for(0, M, grain_rows(3 * F), [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const float* g = ph + m * 2 * F;
      const float* u = g + F;
      const float* dy = pg + m * F;
      float* dg = pgh + m * 2 * F;
      float* du = dg + F;
      const Vec s(ps ? ps[m] : 1.f);
      Vec acc(0.f);
      for (int64_t i = 0; i < F; i += Vec::size()) {
        const int64_t n = std::min<int64_t>(Vec::size(), F - i);
        Vec gv = Vec::loadu(g + i, n), uv = Vec::loadu(u + i, n), dyv = Vec::loadu(dy + i, n);
        Vec sig = (one + gv.neg().exp()).reciprocal();
        Vec act = gv * sig;
        Vec dup = dyv * act;  // grad * silu(g), before the scale
        if (pgs) acc = acc + dup * uv;
        if (pa) (ps ? act * uv * s : act * uv).store(pa + m * F + i, n);
        Vec dsilu = (gv - act + one) * sig;
        Vec dgv = ps ? (dyv * s) * uv * dsilu : dyv * uv * dsilu;
        if (ps) dup = dup * s;
        dup.store(du + i, n);
        dgv.store(dg + i, n);
      }
      if (pgs) pgs[m] = static_cast<float>(lane_sum(acc));
    }
  });
}

torch::Tensor swiglu_forward(const torch::Tensor& h, const c10::optional<torch::Tensor>& scale) {
  check_float_contiguous(h, "h");
  TORCH_CHECK(h.dim() == 2 && h.size(1) % 2 == 0, "moekit swiglu: h must be [M, 2F], got ", h.sizes());
  const int64_t M = h.size(0), F = h.size(1) / 2;
  const float* ps = scale_data(scale, M);
  auto out = torch::empty({M, F}, h.options());
  swiglu_rows(h.data_ptr<float>(), ps, out.data_ptr<float>(), M, F);
  return out;
}

std::vector<torch::Tensor> swiglu_backward(const torch::Tensor& grad, const torch::Tensor& h,
                                           const c10::optional<torch::Tensor>& scale, bool need_grad_scale) {
  check_float_contiguous(grad, "grad");
  check_float_contiguous(h, "h");
  const int64_t M = h.size(0), F = h.size(1) / 2;
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == M && grad.size(1) == F, "moekit swiglu: grad must be [", M, ", ",
              F, "], got ", grad.sizes());
  const float* ps = scale_data(scale, M);
  auto grad_h = torch::empty_like(h);
  torch::Tensor grad_scale;
  float* pgs = nullptr;
  if (need_grad_scale && ps) {
    grad_scale = torch::empty({M}, h.options());
    pgs = grad_scale.data_ptr<float>();
  }
  swiglu_backward_rows(grad.data_ptr<float>(), h.data_ptr<float>(), ps, grad_h.data_ptr<float>(), pgs, M, F);
  return {grad_h, grad_scale};
}

// ---------------------------------------------------------------------------------------------------------------
// SwiGLU experts over expert-sorted rows, one expert at a time: x_e @ w_in[e] -> swiglu (* scale) -> @ w_out[e],
// and in backward the five products and the SwiGLU backward of expert e back to back, so each expert's
// intermediates ([n, 2F] and [n, F], n ~ a few hundred rows) stay in cache between the GEMMs that make and use them
// instead of round-tripping [M, 2F] tensors through memory, and the loop over experts costs no Python. The
// activation [M, F] is not saved: the SwiGLU backward pass writes it again per expert from h, for w_out's gradient.
//   x [M, D] rows of expert e at offsets sum(counts[:e]), counts [E] int64 summing to M, w_in [E, D, 2F] (gate then
//   up), w_out [E, F, D], scale [M] or none. Forward returns (y [M, D], h [M, 2F] for the backward).
//   With rows [M] (the plan's token index), x is the [T, D] token tensor and expert e's rows are gathered from it
//   into a cached scratch just before its GEMM (no [M, D] copy of the input is ever made); in backward grad_y is
//   then [T, D] too (the gradient of the combined output) and is gathered the same way. grad_x is per slot [M, D].

namespace {

std::vector<int64_t> segment_counts(const torch::Tensor& counts, int64_t E, int64_t M) {
  TORCH_CHECK(counts.device().is_cpu() && counts.scalar_type() == at::kLong && counts.dim() == 1 &&
                  counts.numel() == E, "moekit experts: counts must be a CPU int64 tensor of ", E, " values");
  auto c = counts.contiguous();
  std::vector<int64_t> out(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + E);
  int64_t total = 0;
  for (int64_t n : out) {
    TORCH_CHECK(n >= 0, "moekit experts: negative row count ", n);
    total += n;
  }
  TORCH_CHECK(total == M, "moekit experts: counts sum to ", total, ", x has ", M, " rows");
  return out;
}

// Row indices [M] into a [T, D] tensor (nullptr when absent), checked once.
const int64_t* row_index(const c10::optional<torch::Tensor>& rows, int64_t T) {
  if (!rows.has_value()) return nullptr;
  TORCH_CHECK(rows->device().is_cpu() && rows->scalar_type() == at::kLong && rows->is_contiguous() &&
                  rows->dim() == 1, "moekit experts: rows must be a contiguous 1-d CPU int64 tensor");
  const int64_t* r = rows->data_ptr<int64_t>();
  for (int64_t i = 0; i < rows->numel(); ++i)
    TORCH_CHECK(r[i] >= 0 && r[i] < T, "moekit experts: row index ", r[i], " out of range for ", T, " rows");
  return r;
}

// Rows [off, off + n) of the expert-sorted [M, D] view of src: src's own rows, or src[rows[off + j]] gathered into
// buf (a [>= n, D] scratch that stays in cache) when src is the [T, D] token tensor.
torch::Tensor segment_rows(const torch::Tensor& src, const int64_t* rows, int64_t off, int64_t n,
                           const torch::Tensor& buf) {
  if (!rows) return src.narrow(0, off, n);
  const int64_t D = src.size(1);
  const float* ps = src.data_ptr<float>();
  float* pb = buf.data_ptr<float>();
  at::parallel_for(0, n, grain_rows(D), [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const float* src_row = ps + rows[off + j] * D;
      std::copy(src_row, src_row + D, pb + j * D);
    }
  });
  return buf.narrow(0, 0, n);
}

// dst[rows[j]] += src[j] for j < n (src [n, D] contiguous, dst [T, D]): the combine of one expert's output rows
// into their tokens. Threads split the columns, so a token listed twice in one segment is still summed without a
// race; each token's rows are added in expert order, then segment order.
void add_rows_into(const float* src, int64_t n, const int64_t* rows, float* dst, int64_t D) {
  constexpr int64_t kBlock = 4 * Vec::size();
  at::parallel_for(0, (D + kBlock - 1) / kBlock, std::max<int64_t>(1, 8192 / std::max<int64_t>(n * kBlock, 1)),
                   [&](int64_t b0, int64_t b1) {
    const int64_t c0 = b0 * kBlock, c1 = std::min(D, b1 * kBlock);
    for (int64_t j = 0; j < n; ++j) {
      const float* sj = src + j * D;
      float* dj = dst + rows[j] * D;
      for (int64_t c = c0; c < c1; c += Vec::size()) {
        const int64_t w = std::min<int64_t>(Vec::size(), c1 - c);
        (Vec::loadu(dj + c, w) + Vec::loadu(sj + c, w)).store(dj + c, w);
      }
    }
  });
}

// The weights may be float32 or bfloat16 (both the same): bfloat16 ones are converted to float32 one expert at a time
// (`float_weight`) and computed in float32, for CPUs without bfloat16 matrix instructions, where bfloat16 GEMMs are
// emulated at about a quarter of the float32 rate; their gradients are computed in float32 and rounded once.
void check_expert_weights(const torch::Tensor& x, const torch::Tensor& w_in, const torch::Tensor& w_out) {
  check_float_contiguous(x, "x");
  for (const auto* w : {&w_in, &w_out})
    TORCH_CHECK(w->device().is_cpu() && w->is_contiguous() &&
                    (w->scalar_type() == at::kFloat || w->scalar_type() == at::kBFloat16),
                "moekit experts: weights must be contiguous float32 or bfloat16 CPU tensors, got ", w->scalar_type(),
                " on ", w->device(), w->is_contiguous() ? "" : " (not contiguous)");
  TORCH_CHECK(w_in.scalar_type() == w_out.scalar_type(), "moekit experts: w_in is ", w_in.scalar_type(),
              " but w_out is ", w_out.scalar_type());
  TORCH_CHECK(x.dim() == 2 && w_in.dim() == 3 && w_out.dim() == 3 && w_in.size(1) == x.size(1) &&
                  w_in.size(2) == 2 * w_out.size(1) && w_out.size(0) == w_in.size(0) && w_out.size(2) == x.size(1),
              "moekit experts: w_in ", w_in.sizes(), " and w_out ", w_out.sizes(), " do not fit x ", x.sizes(),
              " (expected [E, D, 2F] and [E, F, D])");
}

// Expert e's [K, N] matrix of w in float32: the tensor's own view, or converted into buf (an [K, N] float32
// scratch) when w is bfloat16.
torch::Tensor float_weight(const torch::Tensor& w, int64_t e, const torch::Tensor& buf) {
  if (w.scalar_type() == at::kFloat) return w[e];
  return buf.copy_(w[e]);
}

// A [K, N] float32 scratch for one expert's matrix of w when w is bfloat16 (empty otherwise).
torch::Tensor weight_buffer(const torch::Tensor& w, const torch::Tensor& x) {
  if (w.scalar_type() == at::kFloat) return torch::empty({0}, x.options());
  return torch::empty({w.size(1), w.size(2)}, x.options());
}

}  // namespace

// With rows and combine, y is the combined [T, D] output (each token's rows summed, in expert order) instead of
// the per-slot [M, D] one, which is then never made: each expert's output rows go from a cached scratch into their
// tokens.
std::vector<torch::Tensor> experts_swiglu_forward(const torch::Tensor& x, const c10::optional<torch::Tensor>& rows,
                                                  const torch::Tensor& counts, const torch::Tensor& w_in,
                                                  const torch::Tensor& w_out,
                                                  const c10::optional<torch::Tensor>& scale, bool combine) {
  check_expert_weights(x, w_in, w_out);
  const int64_t M = rows.has_value() ? rows->numel() : x.size(0), D = x.size(1), E = w_in.size(0), F = w_out.size(1);
  const int64_t* r = row_index(rows, x.size(0));
  const std::vector<int64_t> n_e = segment_counts(counts, E, M);
  const float* ps = scale_data(scale, M);
  const bool fuse_combine = combine && r;
  auto h = torch::empty({M, 2 * F}, x.options());
  auto y = fuse_combine ? torch::zeros({x.size(0), D}, x.options()) : torch::empty({M, D}, x.options());
  const int64_t max_n = M ? *std::max_element(n_e.begin(), n_e.end()) : 0;
  auto a = torch::empty({max_n, F}, x.options());
  auto x_buf = torch::empty({r ? max_n : 0, D}, x.options());
  auto y_buf = torch::empty({fuse_combine ? max_n : 0, D}, x.options());
  const auto wi_buf = weight_buffer(w_in, x), wo_buf = weight_buffer(w_out, x);
  for (int64_t e = 0, off = 0; e < E; off += n_e[e], ++e) {
    const int64_t n = n_e[e];
    if (!n) continue;
    auto h_e = h.narrow(0, off, n);
    auto a_e = a.narrow(0, 0, n);
    at::mm_out(h_e, segment_rows(x, r, off, n, x_buf), float_weight(w_in, e, wi_buf));
    swiglu_rows(h_e.data_ptr<float>(), ps ? ps + off : nullptr, a_e.data_ptr<float>(), n, F);
    auto y_e = fuse_combine ? y_buf.narrow(0, 0, n) : y.narrow(0, off, n);
    at::mm_out(y_e, a_e, float_weight(w_out, e, wo_buf));
    if (fuse_combine) add_rows_into(y_e.data_ptr<float>(), n, r + off, y.data_ptr<float>(), D);
  }
  return {y, h};
}

// Returns (grad_x, grad_w_in, grad_w_out, grad_scale); each undefined where not asked for (grad_scale also when
// there is no scale). An expert with no rows gets zero weight gradients.
std::vector<torch::Tensor> experts_swiglu_backward(const torch::Tensor& grad_y, const torch::Tensor& x,
                                                   const c10::optional<torch::Tensor>& rows, const torch::Tensor& h,
                                                   const torch::Tensor& counts, const torch::Tensor& w_in,
                                                   const torch::Tensor& w_out,
                                                   const c10::optional<torch::Tensor>& scale, bool need_grad_x,
                                                   bool need_grad_w, bool need_grad_scale, bool combine) {
  check_expert_weights(x, w_in, w_out);
  check_float_contiguous(grad_y, "grad_y");
  check_float_contiguous(h, "h");
  const int64_t M = h.size(0), D = x.size(1), E = w_in.size(0), F = w_out.size(1);
  const int64_t* r = row_index(rows, x.size(0));
  TORCH_CHECK(grad_y.sizes() == x.sizes() && h.size(1) == 2 * F && (r ? rows->numel() : x.size(0)) == M,
              "moekit experts: grad_y ", grad_y.sizes(), " / h ", h.sizes(), " do not fit x ", x.sizes());
  const std::vector<int64_t> n_e = segment_counts(counts, E, M);
  const float* ps = scale_data(scale, M);
  torch::Tensor grad_x, grad_w_in, grad_w_out, grad_scale;
  const bool fuse_combine = combine && r;  // grad_x [T, D]: each token's slot rows summed (in expert order)
  if (need_grad_x) grad_x = fuse_combine ? torch::zeros({x.size(0), D}, x.options()) : torch::empty({M, D}, x.options());
  if (need_grad_w) {
    grad_w_in = torch::empty_like(w_in);
    grad_w_out = torch::empty_like(w_out);
  }
  if (need_grad_scale && ps) grad_scale = torch::empty({M}, x.options());
  const int64_t max_n = M ? *std::max_element(n_e.begin(), n_e.end()) : 0;
  auto a = torch::empty({max_n, F}, x.options());
  auto grad_a = torch::empty({max_n, F}, x.options());
  auto grad_h = torch::empty({max_n, 2 * F}, x.options());
  auto x_buf = torch::empty({r ? max_n : 0, D}, x.options());
  auto gy_buf = torch::empty({r ? max_n : 0, D}, x.options());
  auto gx_buf = torch::empty({fuse_combine && need_grad_x ? max_n : 0, D}, x.options());
  // bfloat16 weights: each expert's matrices converted to float32 scratch, its weight gradients made in float32
  // scratch and rounded into the bfloat16 gradient once
  const auto wi_buf = weight_buffer(w_in, x), wo_buf = weight_buffer(w_out, x);
  const bool bf16 = w_in.scalar_type() != at::kFloat;
  const auto gwi_buf = need_grad_w && bf16 ? weight_buffer(w_in, x) : torch::Tensor();
  const auto gwo_buf = need_grad_w && bf16 ? weight_buffer(w_out, x) : torch::Tensor();
  for (int64_t e = 0, off = 0; e < E; off += n_e[e], ++e) {
    const int64_t n = n_e[e];
    if (!n) {
      if (need_grad_w) {
        grad_w_in[e].zero_();
        grad_w_out[e].zero_();
      }
      continue;
    }
    auto h_e = h.narrow(0, off, n);
    auto gy_e = segment_rows(grad_y, r, off, n, gy_buf);
    auto ga_e = grad_a.narrow(0, 0, n);
    auto gh_e = grad_h.narrow(0, 0, n);
    const float* ps_e = ps ? ps + off : nullptr;
    at::mm_out(ga_e, gy_e, float_weight(w_out, e, wo_buf).t());
    auto a_e = a.narrow(0, 0, n);  // the activation, rewritten by the SwiGLU backward's pass (not saved in forward)
    swiglu_backward_rows(ga_e.data_ptr<float>(), h_e.data_ptr<float>(), ps_e, gh_e.data_ptr<float>(),
                         grad_scale.defined() ? grad_scale.data_ptr<float>() + off : nullptr, n, F,
                         need_grad_w ? a_e.data_ptr<float>() : nullptr);
    if (need_grad_w) {
      auto gwo = bf16 ? gwo_buf : grad_w_out[e];
      at::mm_out(gwo, a_e.t(), gy_e);
      if (bf16) grad_w_out[e].copy_(gwo);
    }
    if (need_grad_x) {
      auto gx_e = fuse_combine ? gx_buf.narrow(0, 0, n) : grad_x.narrow(0, off, n);
      at::mm_out(gx_e, gh_e, float_weight(w_in, e, wi_buf).t());
      if (fuse_combine) add_rows_into(gx_e.data_ptr<float>(), n, r + off, grad_x.data_ptr<float>(), D);
    }
    if (need_grad_w) {
      auto gwi = bf16 ? gwi_buf : grad_w_in[e];
      at::mm_out(gwi, segment_rows(x, r, off, n, x_buf).t(), gh_e);
      if (bf16) grad_w_in[e].copy_(gwi);
    }
  }
  return {grad_x, grad_w_in, grad_w_out, grad_scale};
}

// RMSNorm forward: y = x * rstd * w, rstd = 1 / sqrt(mean(x^2) + eps) per row (see `dot` for the sum).
std::vector<torch::Tensor> rms_norm_forward(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  check_float_contiguous(x, "x");
  check_float_contiguous(w, "weight");
  const int64_t D = x.size(-1), N = D ? x.numel() / D : 0;
  TORCH_CHECK(w.numel() == D, "moekit rms_norm: weight must have ", D, " values, got ", w.numel());
  auto y = torch::empty_like(x);
  auto rstd = torch::empty({N, 1}, x.options());
  const float* px = x.data_ptr<float>();
  const float* pw = w.data_ptr<float>();
  float* py = y.data_ptr<float>();
  float* pr = rstd.data_ptr<float>();
  at::parallel_for(0, N, grain_rows(D), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = px + r * D;
      float* yr = py + r * D;
      const float ss = dot(xr, xr, D);
      const float rs = static_cast<float>(1.0 / std::sqrt(static_cast<double>(ss) / D + eps));
      pr[r] = rs;
      const Vec rv(rs);
      int64_t i = 0;
      for (; i + Vec::size() <= D; i += Vec::size()) (Vec::loadu(xr + i) * rv * Vec::loadu(pw + i)).store(yr + i);
      for (; i < D; ++i) yr[i] = xr[i] * rs * pw[i];
    }
  });
  return {y, rstd};
}

// RMSNorm backward: xhat = x * rstd; dxhat = g * w; grad_x = rstd * (dxhat - xhat * mean(dxhat * xhat));
// grad_w = sum over rows of g * xhat (per-task partial sums in double, added in task order: deterministic).
std::vector<torch::Tensor> rms_norm_backward(const torch::Tensor& grad, const torch::Tensor& x,
                                             const torch::Tensor& rstd, const torch::Tensor& w, bool need_x,
                                             bool need_w) {
  check_float_contiguous(grad, "grad");
  check_float_contiguous(x, "x");
  check_float_contiguous(rstd, "rstd");
  check_float_contiguous(w, "weight");
  const int64_t D = x.size(-1), N = D ? x.numel() / D : 0;
  TORCH_CHECK(grad.numel() == x.numel(), "moekit rms_norm: grad must have the shape of x");
  torch::Tensor grad_x = need_x ? torch::empty_like(x) : torch::Tensor();
  torch::Tensor grad_w;
  const float* pg = grad.data_ptr<float>();
  const float* px = x.data_ptr<float>();
  const float* pr = rstd.data_ptr<float>();
  const float* pw = w.data_ptr<float>();
  float* pgx = need_x ? grad_x.data_ptr<float>() : nullptr;
  // A fixed number of row chunks (not one per thread): the same partial sums whatever the thread count.
  const int64_t chunks = std::min<int64_t>(N, 64);
  std::vector<double> partial(need_w ? chunks * D : 0, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t cbegin, int64_t cend) {
    std::vector<float> xhat(D), dxhat(D);
    for (int64_t c = cbegin; c < cend; ++c) {
      double* acc = need_w ? partial.data() + c * D : nullptr;
      for (int64_t r = c * N / chunks; r < (c + 1) * N / chunks; ++r) {
        const float* gr = pg + r * D;
        const float* xr = px + r * D;
        const float rs = pr[r];
        for (int64_t i = 0; i < D; ++i) xhat[i] = xr[i] * rs;
        if (acc) {
          for (int64_t i = 0; i < D; ++i) acc[i] += static_cast<double>(gr[i] * xhat[i]);
        }
        if (pgx) {
          for (int64_t i = 0; i < D; ++i) dxhat[i] = gr[i] * pw[i];
          const float mean = dot(dxhat.data(), xhat.data(), D) / static_cast<float>(D);
          float* gxr = pgx + r * D;
          for (int64_t i = 0; i < D; ++i) gxr[i] = (dxhat[i] - xhat[i] * mean) * rs;
        }
      }
    }
  });
  if (need_w) {
    std::vector<double> total(D, 0.0);
    for (int64_t c = 0; c < chunks; ++c)
      for (int64_t i = 0; i < D; ++i) total[i] += partial[c * D + i];
    grad_w = torch::empty({D}, x.options());
    float* pgw = grad_w.data_ptr<float>();
    for (int64_t i = 0; i < D; ++i) pgw[i] = static_cast<float>(total[i]);
  }
  return {grad_x, grad_w};
}

// RoPE: out[..., :Y] = x1 * c - x2 * s, out[..., Y:] = x2 * c + x1 * s (s negated for the backward), each product
// rounded before the sum as transformers' q * cos + rotate_half(q) * sin rounds it. x and out are [B, S, N, 2Y] with
// any strides but a unit last one (out may be a heads-major buffer seen as [B, S, N, 2Y]); cos/sin are [S, Y].
void rope(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin, bool negate_sin,
          torch::Tensor& out) {
  TORCH_CHECK(x.dim() == 4 && out.sizes() == x.sizes(), "moekit rope: x and out must be [B, S, N, X] alike");
  for (const torch::Tensor* t : std::initializer_list<const torch::Tensor*>{&x, &cos, &sin, &out})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->stride(-1) == 1,
                "moekit rope: float32 CPU tensors with a unit last stride expected");
  const int64_t B = x.size(0), S = x.size(1), N = x.size(2), Y = x.size(3) / 2;
  TORCH_CHECK(cos.dim() == 2 && cos.size(0) == S && cos.size(1) == Y && sin.sizes() == cos.sizes(),
              "moekit rope: cos/sin must be [S, X/2] = [", S, ", ", Y, "], got ", cos.sizes());
  const float* px = x.data_ptr<float>();
  const float* pc = cos.data_ptr<float>();
  const float* ps = sin.data_ptr<float>();
  float* po = out.data_ptr<float>();
  const int64_t xb = x.stride(0), xs = x.stride(1), xn = x.stride(2);
  const int64_t ob = out.stride(0), os = out.stride(1), on = out.stride(2);
  const int64_t cs = cos.stride(0), ss = sin.stride(0);
  at::parallel_for(0, B * S * N, grain_rows(2 * Y), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / (S * N), si = (r / N) % S, n = r % N;
      const float* x1 = px + b * xb + si * xs + n * xn;
      const float* x2 = x1 + Y;
      float* o1 = po + b * ob + si * os + n * on;
      float* o2 = o1 + Y;
      const float* c = pc + si * cs;
      const float* sn = ps + si * ss;
      for (int64_t i = 0; i < Y; i += Vec::size()) {
        const int64_t k = std::min<int64_t>(Vec::size(), Y - i);
        Vec a = Vec::loadu(x1 + i, k), bb = Vec::loadu(x2 + i, k), cv = Vec::loadu(c + i, k);
        Vec sv = Vec::loadu(sn + i, k);
        if (negate_sin) sv = sv.neg();
        (a * cv - bb * sv).store(o1 + i, k);
        (bb * cv + a * sv).store(o2 + i, k);
      }
    }
  });
}

// Cross-entropy over rows of logits [N, V] with integer targets [N] (ignore_index rows count nothing):
// returns (sum of the losses of the counted rows, their number, and when with_grad the gradient of the mean loss
// with respect to the logits, else an undefined tensor); logsumexp per row in double. The gradient row,
// (softmax - one-hot) / count, is written while the row is still in cache: one pass over the logits instead of two.
std::vector<torch::Tensor> cross_entropy_forward(const torch::Tensor& logits, const torch::Tensor& targets,
                                                 int64_t ignore_index, bool with_grad) {
  check_float_contiguous(logits, "logits");
  TORCH_CHECK(logits.dim() == 2, "moekit cross_entropy: logits must be [N, V], got ", logits.sizes());
  TORCH_CHECK(targets.scalar_type() == at::kLong && targets.is_contiguous() && targets.numel() == logits.size(0),
              "moekit cross_entropy: targets must be N contiguous int64 values");
  const int64_t N = logits.size(0), V = logits.size(1);
  std::vector<double> row_loss(N, 0.0);
  const float* pl = logits.data_ptr<float>();
  const int64_t* pt = targets.data_ptr<int64_t>();
  int64_t count = 0;  // the counted rows (an out-of-range target raises below)
  for (int64_t r = 0; r < N; ++r) count += pt[r] != ignore_index;
  torch::Tensor grad;
  float* pg = nullptr;
  const float sc = count ? static_cast<float>(1.0 / static_cast<double>(count)) : 0.f;
  if (with_grad) {
    grad = torch::empty_like(logits);
    pg = grad.data_ptr<float>();
  }
  bool bad = false;
  int64_t bad_value = 0;
  at::parallel_for(0, N, grain_rows(V), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* x = pl + r * V;
      float mx = -std::numeric_limits<float>::infinity();
      {
        Vec mxv(mx);
        int64_t i = 0;
        for (; i + Vec::size() <= V; i += Vec::size()) mxv = at::vec::maximum(mxv, Vec::loadu(x + i));
        float lanes[Vec::size()];
        mxv.store(lanes);
        for (int64_t l = 0; l < Vec::size(); ++l) mx = std::max(mx, lanes[l]);
        for (; i < V; ++i) mx = std::max(mx, x[i]);
      }
      Vec acc(0.f);
      const Vec mv(mx);
      float* g = pg ? pg + r * V : nullptr;  // with the gradient: exp(x - max) kept there for the second pass
      int64_t i = 0;
      for (; i + Vec::size() <= V; i += Vec::size()) {
        const Vec e = (Vec::loadu(x + i) - mv).exp();
        if (g) e.store(g + i);
        acc = acc + e;
      }
      double sum = lane_sum(acc);
      for (; i < V; ++i) {
        const double e = std::exp(static_cast<double>(x[i]) - mx);
        if (g) g[i] = static_cast<float>(e);
        sum += e;
      }
      const double l = static_cast<double>(mx) + std::log(sum);
      const int64_t t = pt[r];
      if (t == ignore_index) {
        if (g) std::fill(g, g + V, 0.f);
        continue;
      }
      if (t < 0 || t >= V) {
        bad = true;
        bad_value = t;
        continue;
      }
      row_loss[r] = l - x[t];
      if (g) {  // (softmax - one-hot) * scale = exp(x - max) * (scale / sum) - [v == t] * scale
        const Vec f(static_cast<float>(sc / sum));
        for (int64_t v = 0; v < V; v += Vec::size()) {
          const int64_t k = std::min<int64_t>(Vec::size(), V - v);
          (Vec::loadu(g + v, k) * f).store(g + v, k);
        }
        g[t] -= sc;
      }
    }
  });
  TORCH_CHECK(!bad, "moekit cross_entropy: target ", bad_value, " is out of range [0, ", V, ")");
  double total = 0.0;
  for (int64_t r = 0; r < N; ++r) total += row_loss[r];
  auto opts = logits.options().dtype(at::kDouble);
  return {torch::full({}, total, opts), torch::full({}, static_cast<double>(count), opts), grad};
}

// ---------------------------------------------------------------------------------------------------------------
// Causal self-attention over a short chunk (training, or a prefill with no cached prefix), grouped key/value heads.
//   q [B, H, S, X], k and v [B, G, S, X] (H a multiple of G: query head h reads key/value head h / (H / G)), each
//   head's [S, X] rows contiguous, any batch and head strides. out = softmax(scale * q k^T + causal mask) v.
// At the lengths this serves (S of a few hundred, head dims of 32-128) BLAS calls are small and their fixed costs
// dominate (MKL ran [64, 64] x [64, 128] at ~30 GFLOP/s here, cold), so the products are register-tiled loops of
// fused multiply-adds (`gemm_tile`) that follow the causal triangle: each tile of kAttnRows query rows multiplies
// only the keys up to its last row (about half the square's work). The probabilities P [B, H, S, S] are kept for
// the backward pass, which then needs no second softmax; entries right of a row tile's last key are never written
// nor read. Memory grows with S^2, so the caller takes this path for short chunks only. One task per (b, g) in a
// fixed order: the result does not depend on the thread count.

namespace {

constexpr int kAttnRows = 4;  // rows per register tile (query rows in forward, key rows in the transposed products)
// Vectors per register tile row: kAttnRows x kAttnCols accumulators, kAttnCols loaded B vectors and one broadcast
// must fit the register file: 4 x 4 + 5 = 21 of AVX-512's 32 registers, 4 x 2 + 3 = 11 of AVX2's 16 (4 x 4 there
// spills to the stack in the inner loop).
constexpr int kAttnCols = Vec::size() >= 16 ? 4 : 2;

// C[m, n] = (accumulate ? C[m, n] : 0) + sum over k < K of A(m, k) * B[k, n], for m < MR and n < N, where N fills
// NV vectors (the last has N - (NV - 1) * V lanes, all of it when FULL). A(m, k) = a[m * a_rs + k * a_cs] (any
// strides: each value is broadcast), B and C row-major with leading dimensions ldb and ldc. MR x NV accumulators
// stay in registers; the products are added in k order with one rounding each (fused multiply-add).
template <int MR, int NV, bool FULL>
void gemm_tile(int64_t N, int64_t K, const float* a, int64_t a_rs, int64_t a_cs, const float* b, int64_t ldb,
               float* c, int64_t ldc, bool accumulate) {
  constexpr int64_t V = Vec::size();
  const int64_t tail = FULL ? V : N - (NV - 1) * V;
  Vec acc[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v] = Vec(0.f);
  for (int64_t k = 0; k < K; ++k) {
    const float* bk = b + k * ldb;
    Vec bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = (FULL || v + 1 < NV) ? Vec::loadu(bk + v * V) : Vec::loadu(bk + v * V, tail);
    for (int m = 0; m < MR; ++m) {
      const Vec av(a[m * a_rs + k * a_cs]);
      for (int v = 0; v < NV; ++v) acc[m][v] = at::vec::fmadd(av, bv[v], acc[m][v]);
    }
  }
  for (int m = 0; m < MR; ++m) {
    float* cm = c + m * ldc;
    for (int v = 0; v < NV; ++v) {
      const int64_t w = (FULL || v + 1 < NV) ? V : tail;
      Vec r = acc[m][v];
      if (accumulate) r = r + Vec::loadu(cm + v * V, w);
      r.store(cm + v * V, w);
    }
  }
}

using GemmTileFn = void (*)(int64_t, int64_t, const float*, int64_t, int64_t, const float*, int64_t, float*, int64_t,
                            bool);

template <int MR>
GemmTileFn gemm_tile_for(int64_t nv, bool full) {
  switch (nv) {
    case 1: return full ? gemm_tile<MR, 1, true> : gemm_tile<MR, 1, false>;
    case 2: return full ? gemm_tile<MR, 2, true> : gemm_tile<MR, 2, false>;
    case 3: return full ? gemm_tile<MR, 3, true> : gemm_tile<MR, 3, false>;
    default: return full ? gemm_tile<MR, 4, true> : gemm_tile<MR, 4, false>;
  }
}

// The same product for mr <= kAttnRows rows and any N (in column blocks of kAttnCols vectors).
void gemm_rows(int64_t mr, int64_t N, int64_t K, const float* a, int64_t a_rs, int64_t a_cs, const float* b,
               int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  constexpr int64_t V = Vec::size(), NB = kAttnCols * V;
  for (int64_t n0 = 0; n0 < N; n0 += NB) {
    const int64_t nn = std::min(NB, N - n0), nv = (nn + V - 1) / V;
    const bool full = nn % V == 0;
    GemmTileFn fn = mr == 1 ? gemm_tile_for<1>(nv, full)
                  : mr == 2 ? gemm_tile_for<2>(nv, full)
                  : mr == 3 ? gemm_tile_for<3>(nv, full)
                            : gemm_tile_for<4>(nv, full);
    fn(nn, K, a, a_rs, a_cs, b + n0, ldb, c + n0, ldc, accumulate);
  }
}

void check_heads(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 4 && t.stride(3) == 1 &&
                  t.stride(2) == t.size(3),
              "moekit attention: ", name, " must be a float32 CPU [B, heads, S, X] tensor with contiguous [S, X] "
              "heads, got ", t.scalar_type(), " ", t.sizes(), " with strides ", t.strides());
}

void check_attention_shapes(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v) {
  check_heads(q, "q");
  check_heads(k, "k");
  check_heads(v, "v");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(2) == q.size(2) && k.size(3) == q.size(3) && v.size(0) == k.size(0) &&
                  v.size(1) == k.size(1) && v.size(2) == k.size(2) && v.size(3) > 0 && k.size(1) > 0 &&
                  q.size(1) % k.size(1) == 0,
              "moekit attention: k ", k.sizes(), " and v ", v.sizes(), " do not fit q ", q.sizes(),
              " (expected k [B, G, S, X] and v [B, G, S, Y] with G dividing H)");
}

// Head (b, n) of a [B, N, S, X] tensor with contiguous heads.
inline const float* head(const torch::Tensor& t, int64_t b, int64_t n) {
  return t.data_ptr<float>() + b * t.stride(0) + n * t.stride(1);
}

// dst [X, S] = src [S, X]^T, in blocks of 16 source rows: each destination row is written 16 contiguous values at
// a time while the 16 source rows stay in L1 (a plain double loop stores one value per cache line).
void transpose_head(const float* src, float* dst, int64_t S, int64_t X) {
  constexpr int64_t kRows = 16;
  for (int64_t s0 = 0; s0 < S; s0 += kRows) {
    const int64_t s1 = std::min(S, s0 + kRows);
    for (int64_t x = 0; x < X; ++x)
      for (int64_t s = s0; s < s1; ++s) dst[x * S + s] = src[s * X + x];
  }
}

// One row of raw scores s[0, n): s[j] = softmax_j(scale * s) over j < valid, and 0 for valid <= j < n. scale > 0,
// so the largest scaled score is scale * max(s): two passes over the row (max; exp and sum) and the normalisation.
void softmax_causal_row(float* s, int64_t valid, int64_t n, float scale) {
  constexpr int64_t V = Vec::size();
  const Vec lowest(-std::numeric_limits<float>::infinity());
  Vec mv = lowest;
  for (int64_t j = 0; j < valid; j += V) {
    const int64_t w = std::min(V, valid - j);
    mv = at::vec::maximum(mv, w == V ? Vec::loadu(s + j) : Vec::set(lowest, Vec::loadu(s + j, w), w));
  }
  const float mx = at::vec::vec_reduce_all([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, mv);
  const Vec sv(scale), neg_m(-scale * mx);
  Vec acc(0.f);
  for (int64_t j = 0; j < valid; j += V) {
    const int64_t w = std::min(V, valid - j);
    const Vec e = at::vec::fmadd(Vec::loadu(s + j, w), sv, neg_m).exp();
    e.store(s + j, w);
    acc = acc + (w == V ? e : Vec::set(Vec(0.f), e, w));  // the lanes past w hold exp(-max): not summed
  }
  const Vec inv(static_cast<float>(1.0 / lane_sum(acc)));
  for (int64_t j = 0; j < valid; j += V) {
    const int64_t w = std::min(V, valid - j);
    (Vec::loadu(s + j, w) * inv).store(s + j, w);
  }
  std::fill(s + valid, s + n, 0.f);
}

}  // namespace

// q [B, H, S, X], k [B, G, S, X], v [B, G, S, Y] (Y may differ from X: MLA's value heads). Returns (out [B, H, S, Y],
// P [B, H, S, S]).
std::vector<torch::Tensor> causal_attention_forward(const torch::Tensor& q, const torch::Tensor& k,
                                                    const torch::Tensor& v, double scale) {
  check_attention_shapes(q, k, v);
  TORCH_CHECK(scale > 0, "moekit attention: scale must be positive, got ", scale);
  const int64_t B = q.size(0), H = q.size(1), S = q.size(2), X = q.size(3), Y = v.size(3), G = k.size(1), R = H / G;
  auto out = torch::empty({B, H, S, Y}, q.options());
  auto p = torch::empty({B, H, S, S}, q.options());
  float* po = out.data_ptr<float>();
  float* pp = p.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, B * G, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> kt(X * S);  // this group's keys transposed, [X, S]: the B operand of q k^T
    for (int64_t bg = begin; bg < end; ++bg) {
      const int64_t b = bg / G, g = bg % G;
      transpose_head(head(k, b, g), kt.data(), S, X);
      const float* vg = head(v, b, g);
      for (int64_t h = g * R; h < (g + 1) * R; ++h) {
        const float* qh = head(q, b, h);
        float* ph = pp + (b * H + h) * S * S;
        float* oh = po + (b * H + h) * S * Y;
        for (int64_t m0 = 0; m0 < S; m0 += kAttnRows) {
          const int64_t mr = std::min<int64_t>(kAttnRows, S - m0), n = m0 + mr;  // keys [0, n) for these rows
          gemm_rows(mr, n, X, qh + m0 * X, X, 1, kt.data(), S, ph + m0 * S, S, false);
          for (int64_t i = m0; i < n; ++i) softmax_causal_row(ph + i * S, i + 1, n, sc);
          gemm_rows(mr, Y, n, ph + m0 * S, S, 1, vg, Y, oh + m0 * Y, Y, false);
        }
      }
    }
  });
  return {out, p};
}

// Returns (grad_q [B, H, S, X], grad_k [B, G, S, X], grad_v [B, G, S, Y]). Per (b, g), over its query heads:
// dP = dO V^T; dS = scale * P * (dP - rowsum(dO * out)); dQ = dS K; dV += P^T dO; dK += dS^T Q.
std::vector<torch::Tensor> causal_attention_backward(const torch::Tensor& grad_out, const torch::Tensor& q,
                                                     const torch::Tensor& k, const torch::Tensor& v,
                                                     const torch::Tensor& out, const torch::Tensor& p,
                                                     double scale) {
  check_attention_shapes(q, k, v);
  check_float_contiguous(out, "out");
  check_float_contiguous(p, "P");
  check_heads(grad_out, "grad_out");
  const int64_t B = q.size(0), H = q.size(1), S = q.size(2), X = q.size(3), Y = v.size(3), G = k.size(1), R = H / G;
  const std::vector<int64_t> out_sizes{B, H, S, Y};  // (an IntArrayRef of a braced list would dangle)
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(out_sizes) && out.sizes() == at::IntArrayRef(out_sizes) &&
                  p.sizes() == at::IntArrayRef({B, H, S, S}),
              "moekit attention: grad_out ", grad_out.sizes(), " / out ", out.sizes(), " / P ", p.sizes(),
              " do not fit q ", q.sizes(), " and v ", v.sizes());
  auto gq = torch::empty({B, H, S, X}, q.options());
  auto gk = torch::empty({B, G, S, X}, q.options());
  auto gv = torch::empty({B, G, S, Y}, q.options());
  const float* po = out.data_ptr<float>();
  const float* pp = p.data_ptr<float>();
  float* pgq = gq.data_ptr<float>();
  float* pgk = gk.data_ptr<float>();
  float* pgv = gv.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, B * G, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> vt(Y * S), ds(S * S);  // values transposed [Y, S]; dS of one head [S, S]
    for (int64_t bg = begin; bg < end; ++bg) {
      const int64_t b = bg / G, g = bg % G;
      const float* kg = head(k, b, g);
      transpose_head(head(v, b, g), vt.data(), S, Y);
      float* gkg = pgk + (b * G + g) * S * X;
      float* gvg = pgv + (b * G + g) * S * Y;
      for (int64_t h = g * R; h < (g + 1) * R; ++h) {
        const float* qh = head(q, b, h);
        const float* goh = head(grad_out, b, h);
        const float* oh = po + (b * H + h) * S * Y;
        const float* ph = pp + (b * H + h) * S * S;
        float* gqh = pgq + (b * H + h) * S * X;
        const bool accumulate = h != g * R;  // the group's first head writes dK, dV; the others add
        for (int64_t m0 = 0; m0 < S; m0 += kAttnRows) {  // query rows: dP, dS, dQ
          const int64_t mr = std::min<int64_t>(kAttnRows, S - m0), n = m0 + mr;
          float* dsm = ds.data() + m0 * S;
          gemm_rows(mr, n, Y, goh + m0 * Y, Y, 1, vt.data(), S, dsm, S, false);
          for (int64_t i = m0; i < n; ++i) {
            const float* prow = ph + i * S;
            float* drow = ds.data() + i * S;
            const Vec delta(dot(goh + i * Y, oh + i * Y, Y)), sv(sc);  // rowsum(dO * out)
            for (int64_t j = 0; j <= i; j += Vec::size()) {
              const int64_t w = std::min<int64_t>(Vec::size(), i + 1 - j);
              (Vec::loadu(prow + j, w) * (Vec::loadu(drow + j, w) - delta) * sv).store(drow + j, w);
            }
            std::fill(drow + i + 1, drow + n, 0.f);
          }
          gemm_rows(mr, X, n, dsm, S, 1, kg, X, gqh + m0 * X, X, false);
        }
        for (int64_t j0 = 0; j0 < S; j0 += kAttnRows) {  // key rows: query rows i >= j0 reach them
          const int64_t mr = std::min<int64_t>(kAttnRows, S - j0);
          gemm_rows(mr, Y, S - j0, ph + j0 * S + j0, 1, S, goh + j0 * Y, Y, gvg + j0 * Y, Y, accumulate);
          gemm_rows(mr, X, S - j0, ds.data() + j0 * S + j0, 1, S, qh + j0 * X, X, gkg + j0 * X, X, accumulate);
        }
      }
    }
  });
  return {gq, gk, gv};
}

// ---------------------------------------------------------------------------------------------------------------
// MoE decode: a few token-slots, no autograd. Each touched expert's weights are streamed once from memory (the cost
// of decoding is reading them) for all the tokens routed to it, as row-by-row multiply-adds into float32
// accumulators, instead of PyTorch's ~8 small ops per slot. Float32 or bfloat16 weights (converted to float32 as
// they are loaded: bf16 decode then costs what its bytes cost, where this CPU has no bf16 arithmetic).
//   x [T, D], indices [T, K] (int64, -1 = no expert), weights [T, K] float32, w_in [E, D, 2F] (gate then up),
//   w_out [E, F, D]; x, w_in, w_out of one dtype. Returns (y [T, D] in x's dtype, tokens per expert [E] int64).
//   y[t] = sum over k in slot order of weights[t, k] * (silu(x w_gate) * (x w_up)) w_out, all in float32.

namespace {

inline Vec load_f(const float* p) { return Vec::loadu(p); }
inline Vec load_f(const at::BFloat16* p) {
  Vec v;
  at::vec::load_fp32_from_bf16(p, v);
  return v;
}
inline float to_f(float v) { return v; }
inline float to_f(at::BFloat16 v) { return static_cast<float>(v); }

// acc[j][c] += sum over r < R of a[r * n + j] * w[r * ldw + c], for the n rows j of acc (row stride lda) and
// c < width: R consecutive rows of a weight matrix (row stride ldw) streamed together (R loads in flight per
// accumulator update).
template <int R, typename W>
inline void axpy_rows(float* acc, int64_t lda, const float* a, int64_t n, const W* w, int64_t ldw, int64_t width) {
  int64_t c = 0;
  for (; c + Vec::size() <= width; c += Vec::size()) {
    Vec wv[R];
    for (int r = 0; r < R; ++r) {
      __builtin_prefetch(w + (r + 2 * R) * ldw + c);
      wv[r] = load_f(w + r * ldw + c);
    }
    for (int64_t j = 0; j < n; ++j) {
      float* p = acc + j * lda + c;
      Vec s = Vec::loadu(p);
      for (int r = 0; r < R; ++r) s = at::vec::fmadd(Vec(a[r * n + j]), wv[r], s);
      s.store(p);
    }
  }
  for (; c < width; ++c)  // the last columns one by one, with the same fused multiply-adds as the vector lanes
    for (int64_t j = 0; j < n; ++j)
      for (int r = 0; r < R; ++r) acc[j * lda + c] = std::fma(a[r * n + j], to_f(w[r * ldw + c]), acc[j * lda + c]);
}

// acc [n, width] (row stride width) += the products of a [rows, n] (feature-major) with columns [0, width) of the
// rows x ldw matrix w, four rows at a time. Each output column sums its rows in the same order with the same fused
// multiply-adds whatever the column range (vector lane or scalar tail), so splitting the columns among threads
// changes no bit.
template <typename W>
inline void gemv_rows(float* acc, const float* a, int64_t n, const W* w, int64_t rows, int64_t ldw, int64_t width) {
  int64_t i = 0;
  for (; i + 4 <= rows; i += 4) axpy_rows<4>(acc, width, a + i * n, n, w + i * ldw, ldw, width);
  for (; i < rows; ++i) axpy_rows<1>(acc, width, a + i * n, n, w + i * ldw, ldw, width);
}

// Column blocks per expert for `touched` experts on this many threads: enough units for every thread (two each),
// blocks of at least 64 columns; 1 (whole rows, one sequential stream per matrix) when the experts alone suffice.
int64_t column_blocks(int64_t touched, int64_t width) {
  const int64_t threads = at::get_num_threads();
  const int64_t want = (2 * threads + touched - 1) / std::max<int64_t>(touched, 1);
  return std::max<int64_t>(1, std::min<int64_t>(want, width / 64));
}

template <typename W>
void moe_decode_impl(const torch::Tensor& x, const int64_t* idx, const float* gate_w, const torch::Tensor& w_in,
                     const torch::Tensor& w_out, int64_t T, int64_t K, float* y_slots, int64_t* counts) {
  const int64_t D = x.size(1), E = w_in.size(0), F = w_out.size(1);
  const W* px = x.data_ptr<W>();
  const W* pin = w_in.data_ptr<W>();
  const W* pout = w_out.data_ptr<W>();
  // The touched experts in ascending order, each with its slots in slot order.
  std::vector<std::vector<int64_t>> slots(E);
  for (int64_t s = 0; s < T * K; ++s) {
    const int64_t e = idx[s];
    if (e < 0) continue;
    TORCH_CHECK(e < E, "moekit moe_decode: expert index ", e, " out of range for ", E, " experts");
    slots[e].push_back(s);
  }
  std::vector<int64_t> touched;
  for (int64_t e = 0; e < E; ++e) {
    counts[e] = static_cast<int64_t>(slots[e].size());
    if (counts[e]) touched.push_back(e);
  }
  const int64_t U = static_cast<int64_t>(touched.size());
  // Per touched expert: its tokens' x transposed (feature-major: the n values of input feature i side by side) and,
  // between the two phases, its activation a[f][j] = w_j * silu(gate) * up, feature-major too.
  std::vector<std::vector<float>> xs(U), a_col(U);
  for (int64_t u = 0; u < U; ++u) {
    const std::vector<int64_t>& sl = slots[touched[u]];
    const int64_t n = static_cast<int64_t>(sl.size());
    xs[u].resize(D * n);
    for (int64_t j = 0; j < n; ++j)
      for (int64_t i = 0; i < D; ++i) xs[u][i * n + j] = to_f(px[(sl[j] / K) * D + i]);
    a_col[u].resize(F * n);
  }
  // Phase 1, units (expert, block of the F hidden columns): gate and up columns of the block, then the activation.
  // With one block per expert the gate and up halves are one contiguous stream per row of w_in.
  const int64_t nb1 = column_blocks(U, F);
  at::parallel_for(0, U * nb1, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> h, up;
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t u = unit / nb1, b = unit % nb1, e = touched[u];
      const std::vector<int64_t>& sl = slots[e];
      const int64_t n = static_cast<int64_t>(sl.size());
      const int64_t f0 = b * F / nb1, fw = (b + 1) * F / nb1 - f0;
      const W* wi = pin + e * D * 2 * F;
      int64_t ld;  // row stride of the gate and up accumulators
      const float* gate;
      const float* upv;
      if (nb1 == 1) {  // rows [gate | up] of width 2F
        h.assign(n * 2 * F, 0.f);
        gemv_rows(h.data(), xs[u].data(), n, wi, D, 2 * F, 2 * F);
        ld = 2 * F, gate = h.data(), upv = h.data() + F;
      } else {  // the block's gate and up columns, each [n, fw]
        h.assign(n * fw, 0.f);
        up.assign(n * fw, 0.f);
        gemv_rows(h.data(), xs[u].data(), n, wi + f0, D, 2 * F, fw);
        gemv_rows(up.data(), xs[u].data(), n, wi + F + f0, D, 2 * F, fw);
        ld = fw, gate = h.data(), upv = up.data();
      }
      for (int64_t j = 0; j < n; ++j) {
        const float* g = gate + j * ld;
        const float* uu = upv + j * ld;
        const float s = gate_w[sl[j]];
        for (int64_t f = 0; f < fw; ++f) a_col[u][(f0 + f) * n + j] = s * (g[f] / (1.f + std::exp(-g[f]))) * uu[f];
      }
    }
  });
  // Phase 2, units (expert, block of the D output columns): y = a @ w_out[e][:, block], into each slot's row.
  const int64_t nb2 = column_blocks(U, D);
  at::parallel_for(0, U * nb2, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> y;
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t u = unit / nb2, b = unit % nb2, e = touched[u];
      const std::vector<int64_t>& sl = slots[e];
      const int64_t n = static_cast<int64_t>(sl.size());
      const int64_t d0 = b * D / nb2, dw = (b + 1) * D / nb2 - d0;
      y.assign(n * dw, 0.f);
      gemv_rows(y.data(), a_col[u].data(), n, pout + e * F * D + d0, F, D, dw);
      for (int64_t j = 0; j < n; ++j) std::copy(y.data() + j * dw, y.data() + (j + 1) * dw, y_slots + sl[j] * D + d0);
    }
  });
}

}  // namespace

std::vector<torch::Tensor> moe_decode(const torch::Tensor& x, const torch::Tensor& indices,
                                      const torch::Tensor& weights, const torch::Tensor& w_in,
                                      const torch::Tensor& w_out) {
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16, "moekit moe_decode: x must be float32 or bfloat16, got ", dt);
  for (const auto* t : {&x, &w_in, &w_out})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == dt && t->is_contiguous(),
                "moekit moe_decode: x, w_in and w_out must be contiguous CPU tensors of one dtype");
  TORCH_CHECK(x.dim() == 2 && w_in.dim() == 3 && w_out.dim() == 3, "moekit moe_decode: expected x [T, D], w_in "
              "[E, D, 2F], w_out [E, F, D]");
  const int64_t T = x.size(0), D = x.size(1), E = w_in.size(0), F = w_out.size(1);
  TORCH_CHECK(w_in.size(1) == D && w_in.size(2) == 2 * F && w_out.size(0) == E && w_out.size(2) == D,
              "moekit moe_decode: w_in ", w_in.sizes(), " and w_out ", w_out.sizes(), " do not fit x ", x.sizes());
  TORCH_CHECK(indices.scalar_type() == at::kLong && indices.is_contiguous() && indices.dim() == 2 &&
                  indices.size(0) == T, "moekit moe_decode: indices must be contiguous int64 [T, K]");
  const int64_t K = indices.size(1);
  check_float_contiguous(weights, "weights");
  TORCH_CHECK(weights.sizes() == indices.sizes(), "moekit moe_decode: weights ", weights.sizes(),
              " must match indices ", indices.sizes());
  auto y_slots = torch::zeros({T * K, D}, x.options().dtype(at::kFloat));  // rows of empty slots stay zero
  auto counts = torch::empty({E}, indices.options());
  const int64_t* idx = indices.data_ptr<int64_t>();
  if (dt == at::kFloat)
    moe_decode_impl<float>(x, idx, weights.data_ptr<float>(), w_in, w_out, T, K, y_slots.data_ptr<float>(),
                           counts.data_ptr<int64_t>());
  else
    moe_decode_impl<at::BFloat16>(x, idx, weights.data_ptr<float>(), w_in, w_out, T, K,
                                  y_slots.data_ptr<float>(), counts.data_ptr<int64_t>());
  // Each token's slots summed in slot order (fixed: the result does not depend on the thread count).
  auto y = torch::empty({T, D}, x.options());
  const float* ps = y_slots.data_ptr<float>();
  float* pf = dt == at::kFloat ? y.data_ptr<float>() : nullptr;
  at::BFloat16* pb = dt == at::kFloat ? nullptr : y.data_ptr<at::BFloat16>();
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t d = 0; d < D; ++d) {
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k) acc += ps[(t * K + k) * D + d];
      if (pf)
        pf[t * D + d] = acc;
      else
        pb[t * D + d] = static_cast<at::BFloat16>(acc);
    }
  }
  return {y, counts};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("swiglu_forward", &swiglu_forward, "silu(gate) * up (* scale), fused");
  m.def("swiglu_backward", &swiglu_backward, "backward of swiglu_forward");
  m.def("rms_norm_forward", &rms_norm_forward, "RMSNorm forward, returns (y, rstd [N, 1])");
  m.def("rms_norm_backward", &rms_norm_backward, "RMSNorm backward, returns (grad_x, grad_w)");
  m.def("rope", &rope, "rotary position embedding into out");
  m.def("cross_entropy_forward", &cross_entropy_forward, "(loss sum, count, grad of the mean or undefined)");
  m.def("experts_swiglu_forward", &experts_swiglu_forward, "SwiGLU experts over sorted rows, (y, h)");
  m.def("experts_swiglu_backward", &experts_swiglu_backward, "backward of experts_swiglu_forward");
  m.def("causal_attention_forward", &causal_attention_forward, "causal GQA attention, (out, P)");
  m.def("causal_attention_backward", &causal_attention_backward, "backward of causal_attention_forward");
  m.def("moe_decode", &moe_decode, "SwiGLU MoE experts for a few token-slots, (y, tokens per expert)");
}
