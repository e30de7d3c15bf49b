// Backward of FILIP late interaction on the CPU: route each output gradient to the token that won the max.
//
// Contract (models/late_interaction_blocked.py saves these in its forward):
//   x [B_i, n1, d], y [B_t, n2, d]          token rows (fp32 or fp64, contiguous)
//   wx [B_i, n1], wy [B_t, n2]              token weights (mask / count), same dtype
//   arg_r [B_i, n1, B_t] int16 (i, k, j)    text token r that won max_r <x_ik, y_jr>   (empty when no i2t)
//   arg_k [B_i, n2, B_t] int16 (i, r, j)    image token k that won max_k <x_ik, y_jr>  (empty when no t2i)
//   g_i2t, g_t2i [B_i, B_t]                 output gradients (either may be absent)
// Returns gx [B_i, n1, d], gy [B_t, n2, d]:
//   gx[i,k] += sum_j   g_i2t[i,j] wx[i,k] y[j, arg_r[i,k,j]]                         (A1 gather)
//   gx[i,k] += sum_{(j,r): arg_k[i,r,j]=k} g_t2i[i,j] wy[j,r] y[j,r]                 (A2 scatter)
//   gy[j,r] += sum_{(i,k): arg_r[i,k,j]=r} g_i2t[i,j] wx[i,k] x[i,k]                 (B1 scatter)
//   gy[j,r] += sum_i   g_t2i[i,j] wy[j,r] x[i, arg_k[i,r,j]]                         (B2 gather)
//
// Two passes, each parallel over the rows it writes, so no two threads touch one output row (no atomics, no sort):
//   pass A writes gx, parallel over images i; pass B writes gy, parallel over texts j.
// Each pass walks the *other* side in tiles that stay in a core's L2 (the gathered / scattered-from rows), and inside
// a tile walks its own images (texts) in order. Every output element is summed in an order fixed by the loops alone
// (tiles ascending, then the loop order below), independent of the thread count: the result is bitwise reproducible.
// The d loop is an axpy (no reduction across d), so vectorising it does not change any rounding.

// Only the headers this file uses (not torch/extension.h, which pulls in pybind11 and the C++ frontend): the
// cold build drops from ~55 s to ~15 s on 2 cores. The op is registered with TORCH_LIBRARY, so the .so needs no
// Python module init and loads with torch.ops.load_library.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kTileBytes = 1 << 20;  // tile of the other side's rows: half of the 2 MiB L2, the rest for ours

// Vectors of T as wide as the target's registers (GCC/Clang vector extensions, no intrinsics; a width the target
// lacks is lowered to scalar code, measured 10x slower), loaded and stored with memcpy, which compiles to unaligned
// vector moves (rows are only T-aligned). kAccumulators: half the register file holds one chunk of the row.
#if defined(__AVX512F__)
constexpr int kVectorBytes = 64, kAccumulators = 16;  // d = 256 fp32: the whole row in 16 of 32 zmm
#elif defined(__AVX__)
constexpr int kVectorBytes = 32, kAccumulators = 8;  // 8 of 16 ymm
#else
constexpr int kVectorBytes = 16, kAccumulators = 8;  // 8 of 16 xmm
#endif
// (The vector type is named per T: GCC drops vector_size on a type that depends on a template parameter.)
typedef float vfloat __attribute__((vector_size(kVectorBytes)));
typedef double vdouble __attribute__((vector_size(kVectorBytes)));
template <typename T> struct VecType;
template <> struct VecType<float> { using type = vfloat; };
template <> struct VecType<double> { using type = vdouble; };
template <typename T>
struct Vec {
  using type = typename VecType<T>::type;
  static_assert(sizeof(type) == kVectorBytes, "not a vector type");
  static constexpr int64_t lanes = kVectorBytes / sizeof(T);
  static type load(const T* p) { type v; std::memcpy(&v, p, sizeof(type)); return v; }
  static void store(T* p, type v) { std::memcpy(p, &v, sizeof(type)); }
};

// dst[0:d] += sum_e w[e] * rows[e][0:d], the entries summed in e order in NV register accumulators per chunk of
// NV vectors: each entry costs its row's loads and FMAs only; dst is read and written once per call.
template <typename T, int NV>
inline int64_t gather_chunks(T* dst, const T* const* rows, const T* w, int64_t n, int64_t c0, int64_t d) {
  using V = typename Vec<T>::type;
  constexpr int64_t L = Vec<T>::lanes;
  for (; c0 + NV * L <= d; c0 += NV * L) {
    V acc[NV];
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) acc[v] = V{} ;
    for (int64_t e = 0; e < n; ++e) {
      const T* s = rows[e] + c0;
      const T we = w[e];
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) acc[v] += we * Vec<T>::load(s + v * L);
    }
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) Vec<T>::store(dst + c0 + v * L, Vec<T>::load(dst + c0 + v * L) + acc[v]);
  }
  return c0;
}

template <typename T>
void gather(T* dst, const T* const* rows, const T* w, int64_t n, int64_t d) {
  if (n == 0) return;
  int64_t c0 = gather_chunks<T, kAccumulators>(dst, rows, w, n, 0, d);
  c0 = gather_chunks<T, 1>(dst, rows, w, n, c0, d);
  for (; c0 < d; ++c0) {  // tail when d is not a multiple of a vector
    T acc = T(0);
    for (int64_t e = 0; e < n; ++e) acc += w[e] * rows[e][c0];
    dst[c0] += acc;
  }
}

// Per-thread scratch: one tile's entries (row pointer, weight) grouped by the output row q they go to, in two
// groups summed apart and added to the output one after the other (as the torch path does): the gathered winners
// (`fixed` per row, in slots q * fixed ..) and the scattered ones (counting-sorted by q). Apart, because one group
// can be a few large terms and the other a thousand small ones (a one-token caption wins every image token): in one
// running fp32 sum the small ones would round against the large partial sum (measured: 10x the torch path's error).
template <typename T>
struct Buckets {
  std::vector<const T*> row, grow;
  std::vector<T> w, gw;
  std::vector<int64_t> count, pos;
  int64_t fixed;
  Buckets(int64_t n_out, int64_t fixed_, int64_t cap)
      : row(cap), grow(n_out * fixed_), w(cap), gw(n_out * fixed_), count(n_out + 1), pos(n_out + 1), fixed(fixed_) {}
  void put_gathered(int64_t q, int64_t t, const T* r, T weight) { grow[q * fixed + t] = r; gw[q * fixed + t] = weight; }
  void start() { std::fill(count.begin(), count.end(), 0); }
  void offsets() {  // counting sort: pos[q] = first slot of output row q (stable: entries keep their fill order)
    int64_t at = 0;
    for (size_t q = 0; q + 1 < count.size(); ++q) { pos[q] = at; at += count[q]; }
  }
  void put(int64_t q, const T* r, T weight) { const int64_t e = pos[q]++; row[e] = r; w[e] = weight; }
  // after the fills pos[q] is one past row q's last entry
  void flush(T* out, int64_t d, int64_t n_gathered) {
    for (size_t q = 0; q + 1 < count.size(); ++q) {
      gather(out + q * d, grow.data() + q * fixed, gw.data() + q * fixed, n_gathered, d);
      gather(out + q * d, row.data() + pos[q] - count[q], w.data() + pos[q] - count[q], count[q], d);
    }
  }
};

// gx, parallel over images i; the texts in tiles of ct whose rows y stay in L2. Per (i, tile), the entries of
// gx[i, k] are: A1 its winner y[j, arg_r[i,k,j]] in each text j of the tile (j ascending), then A2 every y[j, r]
// whose winner arg_k[i,r,j] is k (r, then j ascending); summed in that order, then added to gx[i, k].
template <typename T>
void pass_gx(const T* y, const T* wx, const T* wy, const int16_t* arg_r, const int16_t* arg_k, const T* g_i2t,
             const T* g_t2i, T* gx, int64_t b_i, int64_t b_t, int64_t n1, int64_t n2, int64_t d) {
  const int64_t ct = std::max<int64_t>(1, std::min<int64_t>(b_t, kTileBytes / (n2 * d * int64_t(sizeof(T)))));
  at::parallel_for(0, b_i, 1, [&](int64_t i_begin, int64_t i_end) {
    Buckets<T> b(n1, ct, ct * n2);
    for (int64_t j0 = 0; j0 < b_t; j0 += ct) {
      const int64_t j1 = std::min(j0 + ct, b_t);
      for (int64_t i = i_begin; i < i_end; ++i) {
        b.start();
        if (g_t2i)
          for (int64_t r = 0; r < n2; ++r)
            for (int64_t j = j0; j < j1; ++j) ++b.count[arg_k[(i * n2 + r) * b_t + j]];
        b.offsets();
        if (g_i2t)
          for (int64_t k = 0; k < n1; ++k) {
            const int16_t* a = arg_r + (i * n1 + k) * b_t;
            const T wik = wx[i * n1 + k];
            for (int64_t j = j0; j < j1; ++j) b.put_gathered(k, j - j0, y + (j * n2 + a[j]) * d, g_i2t[i * b_t + j] * wik);
          }
        if (g_t2i)
          for (int64_t r = 0; r < n2; ++r) {
            const int16_t* a = arg_k + (i * n2 + r) * b_t;
            for (int64_t j = j0; j < j1; ++j) b.put(a[j], y + (j * n2 + r) * d, g_t2i[i * b_t + j] * wy[j * n2 + r]);
          }
        b.flush(gx + i * n1 * d, d, g_i2t ? j1 - j0 : 0);
      }
    }
  });
}

// gy, parallel over texts j; the images in tiles of ci whose rows x stay in L2. Per (j, tile), the entries of
// gy[j, r] are: B2 its winner x[i, arg_k[i,r,j]] in each image i of the tile (i ascending), then B1 every x[i, k]
// whose winner arg_r[i,k,j] is r (i, then k ascending).
template <typename T>
void pass_gy(const T* x, const T* wx, const T* wy, const int16_t* arg_r, const int16_t* arg_k, const T* g_i2t,
             const T* g_t2i, T* gy, int64_t b_i, int64_t b_t, int64_t n1, int64_t n2, int64_t d) {
  const int64_t ci = std::max<int64_t>(1, std::min<int64_t>(b_i, kTileBytes / (n1 * d * int64_t(sizeof(T)))));
  at::parallel_for(0, b_t, 1, [&](int64_t j_begin, int64_t j_end) {
    Buckets<T> b(n2, ci, ci * n1);
    for (int64_t i0 = 0; i0 < b_i; i0 += ci) {
      const int64_t i1 = std::min(i0 + ci, b_i);
      for (int64_t j = j_begin; j < j_end; ++j) {
        b.start();
        if (g_i2t)
          for (int64_t i = i0; i < i1; ++i)
            for (int64_t k = 0; k < n1; ++k) ++b.count[arg_r[(i * n1 + k) * b_t + j]];
        b.offsets();
        if (g_t2i)
          for (int64_t r = 0; r < n2; ++r) {
            const T wjr = wy[j * n2 + r];
            for (int64_t i = i0; i < i1; ++i)
              b.put_gathered(r, i - i0, x + (i * n1 + arg_k[(i * n2 + r) * b_t + j]) * d, g_t2i[i * b_t + j] * wjr);
          }
        if (g_i2t)
          for (int64_t i = i0; i < i1; ++i) {
            const T g = g_i2t[i * b_t + j];
            for (int64_t k = 0; k < n1; ++k)
              b.put(arg_r[(i * n1 + k) * b_t + j], x + (i * n1 + k) * d, g * wx[i * n1 + k]);
          }
        b.flush(gy + j * n2 * d, d, g_t2i ? i1 - i0 : 0);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> late_interaction_backward(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& wx, const at::Tensor& wy, const at::Tensor& arg_r,
    const at::Tensor& arg_k, const std::optional<at::Tensor>& g_i2t, const std::optional<at::Tensor>& g_t2i,
    bool need_gx, bool need_gy) {
  TORCH_CHECK(x.device().is_cpu() && y.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(x.dim() == 3 && y.dim() == 3 && x.size(2) == y.size(2), "x [B_i, n1, d], y [B_t, n2, d]");
  TORCH_CHECK(x.scalar_type() == y.scalar_type() && wx.scalar_type() == x.scalar_type() &&
                  wy.scalar_type() == x.scalar_type(),
              "x, y, wx, wy: one dtype");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "float32 or float64");
  const int64_t b_i = x.size(0), n1 = x.size(1), d = x.size(2), b_t = y.size(0), n2 = y.size(1);
  const bool use_i2t = g_i2t.has_value() && g_i2t->defined();
  const bool use_t2i = g_t2i.has_value() && g_t2i->defined();
  TORCH_CHECK(!use_i2t || (arg_r.scalar_type() == at::kShort && arg_r.sizes() == at::IntArrayRef({b_i, n1, b_t})),
              "arg_r: int16 [B_i, n1, B_t]");
  TORCH_CHECK(!use_t2i || (arg_k.scalar_type() == at::kShort && arg_k.sizes() == at::IntArrayRef({b_i, n2, b_t})),
              "arg_k: int16 [B_i, n2, B_t]");
  const auto xc = x.contiguous(), yc = y.contiguous(), wxc = wx.contiguous(), wyc = wy.contiguous();
  const auto ar = use_i2t ? arg_r.contiguous() : arg_r, ak = use_t2i ? arg_k.contiguous() : arg_k;
  at::Tensor gi, gt;
  if (use_i2t) gi = g_i2t->to(x.scalar_type()).contiguous();
  if (use_t2i) gt = g_t2i->to(x.scalar_type()).contiguous();
  auto gx = need_gx ? at::zeros_like(xc) : xc.new_empty({0});  // empty: not asked for
  auto gy = need_gy ? at::zeros_like(yc) : yc.new_empty({0});
  // The winners index rows; an out-of-range one would write outside the output, so it is checked (cheap: int16).
  if (use_i2t && ar.numel()) TORCH_CHECK(ar.min().item<int64_t>() >= 0 && ar.max().item<int64_t>() < n2, "arg_r out of range");
  if (use_t2i && ak.numel()) TORCH_CHECK(ak.min().item<int64_t>() >= 0 && ak.max().item<int64_t>() < n1, "arg_k out of range");
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "late_interaction_backward", [&] {
    const auto* gip = use_i2t ? gi.data_ptr<scalar_t>() : nullptr;
    const auto* gtp = use_t2i ? gt.data_ptr<scalar_t>() : nullptr;
    const auto* arp = use_i2t ? ar.data_ptr<int16_t>() : nullptr;
    const auto* akp = use_t2i ? ak.data_ptr<int16_t>() : nullptr;
    if (need_gx && (use_i2t || use_t2i))
      pass_gx<scalar_t>(yc.data_ptr<scalar_t>(), wxc.data_ptr<scalar_t>(),
                        wyc.data_ptr<scalar_t>(), arp, akp, gip, gtp, gx.data_ptr<scalar_t>(), b_i, b_t, n1, n2, d);
    if (need_gy && (use_i2t || use_t2i))
      pass_gy<scalar_t>(xc.data_ptr<scalar_t>(), wxc.data_ptr<scalar_t>(), wyc.data_ptr<scalar_t>(), arp, akp, gip,
                        gtp, gy.data_ptr<scalar_t>(), b_i, b_t, n1, n2, d);
  });
  return {gx, gy};
}

}  // namespace

TORCH_LIBRARY(filip_cpu, m) {
  m.def(
      "late_interaction_backward(Tensor x, Tensor y, Tensor wx, Tensor wy, Tensor arg_r, Tensor arg_k, "
      "Tensor? g_i2t, Tensor? g_t2i, bool need_gx, bool need_gy) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(filip_cpu, CPU, m) { m.impl("late_interaction_backward", &late_interaction_backward); }
