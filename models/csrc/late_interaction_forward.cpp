// Forward of FILIP late interaction on the CPU: each block of the similarity is reduced while it is still in cache.
//
// Contract (models/late_interaction_blocked.py calls it; the backward in late_interaction_backward.cpp reads the
// winners it returns):
//   x [B_i, n1, d], y [B_t, n2, d]          token rows (fp32 or fp64)
//   xm [B_i, n1], ym [B_t, n2] bool         True = a real token
//   wx [B_i, n1], wy [B_t, n2]              token weights (mask / count), fp32 for fp32 rows, else fp64
//   ci, ct                                  images and texts per tile
// Returns i2t, t2i [B_i, B_t] (in wx's dtype) and the winners, int16:
//   i2t[i,j] = sum_k wx[i,k] max_{r real} <x_ik, y_jr>, arg_r [B_i, n1, B_t] = that r   (empty unless want_i2t & keep)
//   t2i[i,j] = sum_r wy[j,r] max_{k real} <x_ik, y_jr>, arg_k [B_i, n2, B_t] = that k   (empty unless want_t2i & keep)
// The argmax is the first maximum (the lowest index), as torch's max pooling returns it. A pair whose image or
// text has no real token is left to the caller (it scores 0 there).
//
// Why this is faster than a matmul followed by the maxima: the whole [B_i n1, B_t n2] product is never written to
// memory. Per tile, one small GEMM (the library's, single-threaded inside the tile loop) writes a
// [ci n1, n2 ct] block that stays in the core's L2, and both maxima read it from there: at B = 128 the one big
// matmul alone writes ~250 MB, which is most of its time on this kind of machine. The text tokens of a tile
// enter the product in (token, text) order, so both maxima are over rows of vectors: max over r for image->text
// runs along j in registers, max over k for text->image along the (r, j) columns.
// Tiles are parallel over (text block, image block); each writes its own part of every output (no atomics), and
// each output element is computed by one fixed sequence of operations: the result does not depend on the threads.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

#if defined(__AVX512F__)
constexpr int kBytes = 64;
#elif defined(__AVX__)
constexpr int kBytes = 32;
#else
constexpr int kBytes = 16;
#endif
typedef float vf __attribute__((vector_size(kBytes)));
typedef int32_t vfi __attribute__((vector_size(kBytes)));
typedef double vd __attribute__((vector_size(kBytes)));
typedef int64_t vdi __attribute__((vector_size(kBytes)));
template <typename T> struct V;
template <> struct V<float> { using val = vf; using idx = vfi; using ielem = int32_t; };
template <> struct V<double> { using val = vd; using idx = vdi; using ielem = int64_t; };
template <typename T> constexpr int64_t lanes() { return kBytes / sizeof(T); }
template <typename U> inline U load(const void* p) { U v; std::memcpy(&v, p, sizeof(U)); return v; }
template <typename U> inline void store(void* p, U v) { std::memcpy(p, &v, sizeof(U)); }

// A padded text token's similarity gains this (far below any similarity, still finite twice over), so it never
// wins unless the text has no real token, a pair the caller zeroes.
template <typename T> constexpr T penalty() { return std::numeric_limits<T>::lowest() / 4; }

// s: [rows = ni * n1, n2 * nb] one tile, column (r, j). For each row (i, k) and text j: best and first argmax over r
// of s + pen[r, j]. best_out [rows, nb] (scratch), arg [rows, nb] int16 written to arg_r when asked.
template <typename T>
void max_over_text_tokens(const T* s, const T* pen, int64_t rows, int64_t n2, int64_t nb, T* best_out,
                          int16_t* arg_out, int64_t arg_stride) {
  using Vv = typename V<T>::val;
  using Vi = typename V<T>::idx;
  constexpr int64_t L = lanes<T>();
  const int64_t width = n2 * nb;
  for (int64_t row = 0; row < rows; ++row) {
    const T* sr = s + row * width;
    T* bo = best_out + row * nb;
    int16_t* ao = arg_out ? arg_out + row * arg_stride : nullptr;
    int64_t j = 0;
    for (; j + L <= nb; j += L) {
      Vv best = load<Vv>(sr + j) + load<Vv>(pen + j);
      Vi arg = Vi{};
      for (int64_t r = 1; r < n2; ++r) {
        const Vv v = load<Vv>(sr + r * nb + j) + load<Vv>(pen + r * nb + j);
        const auto win = v > best;
        best = win ? v : best;
        arg = win ? Vi{} + static_cast<typename V<T>::ielem>(r) : arg;
      }
      store(bo + j, best);
      if (ao)
        for (int64_t l = 0; l < L; ++l) ao[j + l] = static_cast<int16_t>(arg[l]);
    }
    for (; j < nb; ++j) {  // a text block narrower than a vector
      T best = sr[j] + pen[j];
      int64_t arg = 0;
      for (int64_t r = 1; r < n2; ++r) {
        const T v = sr[r * nb + j] + pen[r * nb + j];
        if (v > best) { best = v; arg = r; }
      }
      bo[j] = best;
      if (ao) ao[j] = static_cast<int16_t>(arg);
    }
  }
}

// For one image (its n1 rows of the tile, row stride `width` = n2 * nb): best and first argmax over the real image
// tokens k of every column (r, j). best_out [n2 * nb], arg_out rows r of arg_k (stride arg_stride) when asked.
template <typename T>
void max_over_image_tokens(const T* s, const bool* real, int64_t n1, int64_t width, int64_t nb, T* best_out,
                           int16_t* arg_out, int64_t arg_stride, std::vector<int64_t>& ks) {
  using Vv = typename V<T>::val;
  using Vi = typename V<T>::idx;
  constexpr int64_t L = lanes<T>();
  constexpr int64_t kChunk = 4;  // vectors of columns held in registers over the k loop
  ks.clear();
  for (int64_t k = 0; k < n1; ++k)
    if (real[k]) ks.push_back(k);
  const int64_t nk = static_cast<int64_t>(ks.size());
  int64_t c = 0;
  auto put_args = [&](int64_t c0, const auto& arg, int64_t n) {
    if (!arg_out) return;
    for (int64_t l = 0; l < n; ++l) {
      const int64_t col = c0 + l;  // (r, j)
      arg_out[(col / nb) * arg_stride + col % nb] = static_cast<int16_t>(arg[l]);
    }
  };
  for (; c + kChunk * L <= width; c += kChunk * L) {
    Vv best[kChunk];
    Vi arg[kChunk];
    for (int v = 0; v < kChunk; ++v) { best[v] = load<Vv>(s + ks[0] * width + c + v * L); arg[v] = Vi{} + static_cast<typename V<T>::ielem>(ks[0]); }
    for (int64_t e = 1; e < nk; ++e) {
      const T* row = s + ks[e] * width + c;
      for (int v = 0; v < kChunk; ++v) {
        const Vv x = load<Vv>(row + v * L);
        const auto win = x > best[v];
        best[v] = win ? x : best[v];
        arg[v] = win ? Vi{} + static_cast<typename V<T>::ielem>(ks[e]) : arg[v];
      }
    }
    for (int v = 0; v < kChunk; ++v) {
      store(best_out + c + v * L, best[v]);
      put_args(c + v * L, arg[v], L);
    }
  }
  for (; c < width; ++c) {
    T best = s[ks[0] * width + c];
    int64_t arg = ks[0];
    for (int64_t e = 1; e < nk; ++e) {
      const T x = s[ks[e] * width + c];
      if (x > best) { best = x; arg = ks[e]; }
    }
    best_out[c] = best;
    if (arg_out) arg_out[(c / nb) * arg_stride + c % nb] = static_cast<int16_t>(arg);
  }
}

template <typename T>
void forward_tiles(const at::Tensor& x2, const std::vector<at::Tensor>& yblocks, const bool* xm, const bool* ym,
                   const T* wx, const T* wy, T* i2t, T* t2i, int16_t* arg_r, int16_t* arg_k, int64_t b_i,
                   int64_t b_t, int64_t n1, int64_t n2, int64_t ci, int64_t ct, bool want_i2t, bool want_t2i) {
  const int64_t n_ib = (b_i + ci - 1) / ci, n_jb = (b_t + ct - 1) / ct;
  // Tiles ordered text block first: consecutive tiles of a thread share the text block (the larger operand).
  at::parallel_for(0, n_ib * n_jb, 1, [&](int64_t t_begin, int64_t t_end) {
    at::Tensor s_buf = at::empty({ci * n1, n2 * ct}, x2.options());  // one per thread, reused by its tiles
    std::vector<T> best_r(ci * n1 * ct), best_k(n2 * ct), pen(n2 * ct);
    std::vector<int64_t> ks;
    for (int64_t t = t_begin; t < t_end; ++t) {
      const int64_t jb = t / n_ib, ib = t % n_ib;
      const int64_t i0 = ib * ci, ni = std::min(ci, b_i - i0), j0 = jb * ct, nb = std::min(ct, b_t - j0);
      at::Tensor s = s_buf.narrow(0, 0, ni * n1).narrow(1, 0, n2 * nb);
      if (nb != ct) s = at::empty({ni * n1, n2 * nb}, x2.options());
      at::mm_out(s, x2.narrow(0, i0 * n1, ni * n1), yblocks[jb].t());  // S[i, k, r, j]
      const T* sp = s.data_ptr<T>();
      const int64_t width = n2 * nb;
      if (want_i2t) {
        for (int64_t r = 0; r < n2; ++r)
          for (int64_t j = 0; j < nb; ++j) pen[r * nb + j] = ym[(j0 + j) * n2 + r] ? T(0) : penalty<T>();
        max_over_text_tokens<T>(sp, pen.data(), ni * n1, n2, nb, best_r.data(),
                                arg_r ? arg_r + (i0 * n1) * b_t + j0 : nullptr, b_t);
        for (int64_t i = 0; i < ni; ++i)
          for (int64_t j = 0; j < nb; ++j) {
            T acc = T(0);  // k ascending, in the weights' dtype
            for (int64_t k = 0; k < n1; ++k) acc += wx[(i0 + i) * n1 + k] * best_r[(i * n1 + k) * nb + j];
            i2t[(i0 + i) * b_t + j0 + j] = acc;
          }
      }
      if (want_t2i) {
        for (int64_t i = 0; i < ni; ++i) {
          const bool* real = xm + (i0 + i) * n1;
          if (!std::any_of(real, real + n1, [](bool b) { return b; })) continue;  // no real token: scores 0
          max_over_image_tokens<T>(sp + i * n1 * width, real, n1, width, nb, best_k.data(),
                                   arg_k ? arg_k + ((i0 + i) * n2) * b_t + j0 : nullptr, b_t, ks);
          for (int64_t j = 0; j < nb; ++j) {
            T acc = T(0);  // r ascending
            for (int64_t r = 0; r < n2; ++r) acc += wy[(j0 + j) * n2 + r] * best_k[r * nb + j];
            t2i[(i0 + i) * b_t + j0 + j] = acc;
          }
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> late_interaction_forward(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& xm, const at::Tensor& ym, const at::Tensor& wx,
    const at::Tensor& wy, int64_t ci, int64_t ct, bool want_i2t, bool want_t2i, bool keep_winners) {
  TORCH_CHECK(x.device().is_cpu() && y.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(x.dim() == 3 && y.dim() == 3 && x.size(2) == y.size(2), "x [B_i, n1, d], y [B_t, n2, d]");
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), "x, y: one dtype");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "float32 or float64");
  TORCH_CHECK(wx.scalar_type() == x.scalar_type() && wy.scalar_type() == x.scalar_type(), "wx, wy: x's dtype");
  const int64_t b_i = x.size(0), n1 = x.size(1), d = x.size(2), b_t = y.size(0), n2 = y.size(1);
  TORCH_CHECK(xm.sizes() == at::IntArrayRef({b_i, n1}) && ym.sizes() == at::IntArrayRef({b_t, n2}), "masks");
  TORCH_CHECK(n1 <= 32767 && n2 <= 32767, "at most 32767 tokens a side (int16 winners)");
  TORCH_CHECK(ci >= 1 && ct >= 1, "tiles of at least one image and one text");
  const auto x2 = x.contiguous().view({b_i * n1, d});
  const auto xmc = xm.to(at::kBool).contiguous(), ymc = ym.to(at::kBool).contiguous();
  const auto wxc = wx.contiguous(), wyc = wy.contiguous();
  // Text blocks in (token, text) order, [n2 * nb, d] each: one copy of y in all.
  std::vector<at::Tensor> yblocks;
  for (int64_t j0 = 0; j0 < b_t; j0 += ct)
    yblocks.push_back(y.narrow(0, j0, std::min(ct, b_t - j0)).transpose(0, 1).contiguous().view({-1, d}));
  auto i2t = at::zeros({b_i, b_t}, x.options());
  auto t2i = at::zeros({b_i, b_t}, x.options());
  auto i16 = x.options().dtype(at::kShort);
  auto arg_r = at::empty({b_i, n1, want_i2t && keep_winners ? b_t : 0}, i16);
  auto arg_k = at::zeros({b_i, n2, want_t2i && keep_winners ? b_t : 0}, i16);  // zeros: an image without tokens
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "late_interaction_forward", [&] {
    forward_tiles<scalar_t>(x2, yblocks, xmc.data_ptr<bool>(), ymc.data_ptr<bool>(), wxc.data_ptr<scalar_t>(),
                            wyc.data_ptr<scalar_t>(), i2t.data_ptr<scalar_t>(), t2i.data_ptr<scalar_t>(),
                            arg_r.numel() ? arg_r.data_ptr<int16_t>() : nullptr,
                            arg_k.numel() ? arg_k.data_ptr<int16_t>() : nullptr, b_i, b_t, n1, n2, ci, ct, want_i2t,
                            want_t2i);
  });
  return {i2t, t2i, arg_r, arg_k};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(filip_cpu, m) {
  m.def(
      "late_interaction_forward(Tensor x, Tensor y, Tensor xm, Tensor ym, Tensor wx, Tensor wy, int ci, int ct, "
      "bool want_i2t, bool want_t2i, bool keep_winners) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(filip_cpu, CPU, m) { m.impl("late_interaction_forward", &late_interaction_forward); }
