// Direct NHWC convolution for XLA:CPU (inference forward), for the narrow layers of pruned
// networks; built and registered with XLA by metaprune_jax.cpu_kernels (see xla_hints).
//
// out[b, oy, ox, o] = act(bias[o] + res[b, oy, ox, o]
//                         + sum_{ky, kx, c} x[b, oy*s - p + ky, ox*s - p + kx, c] w[ky, kx, c, o])
//
// with the bias and the residual optional (empty operands) and act the identity or ReLU: a
// folded network's conv -> bias -> (residual add) -> ReLU in one pass over memory.
// Three paths, chosen per call (ConvImpl):
// * RowsPix, at most geom[5] output channels (cpu_kernels.CONV_PIXEL_MAX_OUT, 16) at
//   stride 1 along x, output rows at least 8 pixels wide: vectorised over 16 output pixels (two 8-pixel rows for 8-wide outputs),
//   from input rows transposed into channel planes once per task; no lane is idle whatever the
//   channel counts. With few output channels several 16-pixel tiles (or row pairs) are
//   computed together (PixTilesAtOnce), so that each broadcast weight feeds independent FMA chains: one tile of
//   one channel is a single chain, bound by the FMA latency. AVX-512 builds transpose the input
//   rows into planes (blocks of at least 8 channels), and the accumulators back into NHWC
//   pixels, 16 x 16 in registers (Transpose16) instead of float by float. Measured against the
//   previous version, interleaved: benchmarks/conv_kernel_ab.py.
// * RowDot, otherwise for very narrow outputs (at most kDotMaxOut = 2 channels, AVX-512 builds):
//   a window row of kw pixels is kw * C contiguous floats in NHWC, so each output channel is kh
//   dot products of contiguous spans (masked loads for the tails).
// * Row, otherwise: the output channels padded to whole 16-float vectors (kNV vectors, a
//   template argument), the weights repacked to [kh, kw, C, kNV * 16] once per call, and kTile
//   output pixels of a row computed together so that each weight vector load feeds kTile FMAs;
//   pixels whose window leaves the image take the same loop with bounds checks.
// Work is split over XLA's intra-op thread pool by output rows.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "parallel_for.h"

#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

typedef float v16 __attribute__((vector_size(64)));

using metaprune_cpu::ParallelFor;

struct Geom {
  int64_t B, H, W, C, O, Ho, Wo, kh, kw, sh, sw, ph, pw;
  bool relu;
  const float* res;  // [B, Ho, Wo, O] or null
};

constexpr int kTile = 4;

// One output row (b, oy): kTile pixels at a time where every window is inside the image.
template <int kNV>
void Row(const Geom& g, const float* x, const v16* wp, const v16* bias, float* out, int64_t b,
         int64_t oy) {
  const int64_t iy0 = oy * g.sh - g.ph;
  const int64_t ky0 = std::max<int64_t>(0, -iy0), ky1 = std::min<int64_t>(g.kh, g.H - iy0);
  // ox range whose windows are inside the image in x
  int64_t lo = (g.pw + g.sw - 1) / g.sw;
  int64_t hi = g.W + g.pw - g.kw;  // last valid ox * sw
  hi = hi < 0 ? -1 : hi / g.sw;
  hi = std::min<int64_t>(hi, g.Wo - 1);
  lo = std::min<int64_t>(lo, g.Wo);
  const float* xb = x + b * g.H * g.W * g.C;
  float* ob = out + (b * g.Ho + oy) * g.Wo * g.O;
  alignas(64) v16 acc[kTile][kNV];
  const float* rb = g.res ? g.res + (b * g.Ho + oy) * g.Wo * g.O : nullptr;
  auto store = [&](int64_t ox, v16* a) {
    float* af = reinterpret_cast<float*>(a);
    if (rb) {
      const float* r = rb + ox * g.O;
      for (int64_t o = 0; o < g.O; ++o) af[o] += r[o];
    }
    if (g.relu) {
      for (int v = 0; v < kNV; ++v) a[v] = a[v] > 0.0f ? a[v] : 0.0f;
    }
    std::memcpy(ob + ox * g.O, af, sizeof(float) * g.O);
  };
  auto single = [&](int64_t ox) {
    v16 a[kNV];
    for (int v = 0; v < kNV; ++v) a[v] = bias[v];
    const int64_t ix0 = ox * g.sw - g.pw;
    for (int64_t ky = ky0; ky < ky1; ++ky) {
      for (int64_t kx = 0; kx < g.kw; ++kx) {
        const int64_t ix = ix0 + kx;
        if (ix < 0 || ix >= g.W) continue;
        const float* xr = xb + ((iy0 + ky) * g.W + ix) * g.C;
        const v16* wr = wp + (ky * g.kw + kx) * g.C * kNV;
        for (int64_t c = 0; c < g.C; ++c) {
          const float xv = xr[c];
          for (int v = 0; v < kNV; ++v) a[v] += xv * wr[c * kNV + v];
        }
      }
    }
    store(ox, a);
  };
  for (int64_t ox = 0; ox < lo; ++ox) single(ox);
  int64_t ox = lo;
  for (; ox + kTile - 1 <= hi; ox += kTile) {
    for (int t = 0; t < kTile; ++t)
      for (int v = 0; v < kNV; ++v) acc[t][v] = bias[v];
    const int64_t ix0 = ox * g.sw - g.pw;
    for (int64_t ky = ky0; ky < ky1; ++ky) {
      for (int64_t kx = 0; kx < g.kw; ++kx) {
        const float* xr = xb + ((iy0 + ky) * g.W + ix0 + kx) * g.C;
        const v16* wr = wp + (ky * g.kw + kx) * g.C * kNV;
        const int64_t step = g.sw * g.C;
        for (int64_t c = 0; c < g.C; ++c) {
          const v16* wc = wr + c * kNV;
          for (int t = 0; t < kTile; ++t) {
            const float xv = xr[t * step + c];
            for (int v = 0; v < kNV; ++v) acc[t][v] += xv * wc[v];
          }
        }
      }
    }
    for (int t = 0; t < kTile; ++t) store(ox + t, acc[t]);
  }
  for (; ox < g.Wo; ++ox) single(ox);
}

#ifdef __AVX512F__
constexpr int64_t kDotMaxOut = 2;  // measured: 2-4x faster at O = 1, slower from O = 4

inline float Dot(const float* a, const float* b, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  if (i < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1u);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// One output row with O <= kDotMaxOut; wt: [O, kh, kw * C] (the weights transposed).
void RowDot(const Geom& g, const float* x, const float* wt, const float* bias, float* out,
            int64_t b, int64_t oy) {
  const int64_t iy0 = oy * g.sh - g.ph;
  const int64_t ky0 = std::max<int64_t>(0, -iy0), ky1 = std::min<int64_t>(g.kh, g.H - iy0);
  const int64_t span = g.kw * g.C;
  const float* xb = x + b * g.H * g.W * g.C;
  float* ob = out + (b * g.Ho + oy) * g.Wo * g.O;
  const float* rb = g.res ? g.res + (b * g.Ho + oy) * g.Wo * g.O : nullptr;
  for (int64_t ox = 0; ox < g.Wo; ++ox) {
    const int64_t ix0 = ox * g.sw - g.pw;
    const int64_t kx0 = std::max<int64_t>(0, -ix0), kx1 = std::min<int64_t>(g.kw, g.W - ix0);
    float a[kDotMaxOut];
    for (int64_t o = 0; o < g.O; ++o) {
      float acc = bias ? bias[o] : 0.0f;
      for (int64_t ky = ky0; ky < ky1; ++ky) {
        const float* xr = xb + ((iy0 + ky) * g.W + ix0 + kx0) * g.C;
        const float* wr = wt + (o * g.kh + ky) * span + kx0 * g.C;
        acc += Dot(xr, wr, (kx1 - kx0) * g.C);
      }
      if (rb) acc += rb[ox * g.O + o];
      a[o] = g.relu ? std::max(acc, 0.0f) : acc;
    }
    std::memcpy(ob + ox * g.O, a, sizeof(float) * g.O);
  }
}

void RunDot(ffi::ThreadPool& pool, const Geom& g, const float* x, const float* w,
            const float* bias, float* out) {
  std::vector<float> wt(g.O * g.kh * g.kw * g.C);
  for (int64_t ky = 0; ky < g.kh; ++ky)
    for (int64_t kx = 0; kx < g.kw; ++kx)
      for (int64_t c = 0; c < g.C; ++c)
        for (int64_t o = 0; o < g.O; ++o)
          wt[((o * g.kh + ky) * g.kw + kx) * g.C + c] = w[((ky * g.kw + kx) * g.C + c) * g.O + o];
  ParallelFor(pool, g.B * g.Ho, [&](int64_t i) {
    RowDot(g, x, wt.data(), bias, out, i / g.Ho, i % g.Ho);
  });
}
#endif

// The pixel-vectorised path (stride 1 along x; the caller decides for which widths, geom[5]):
// vectorised over 16 output pixels of a row instead of over the output channels, so no vector
// lane is idle when O is not a multiple of 16 (over the channels, O = 7 would use 7 of 16
// lanes), and a tile of 16 pixels x kO <= 16 channels keeps kO accumulators in registers. Each
// task (a block of output rows of one image, RunPix) transposes the input rows it needs into zero-padded
// channel planes [row][C][wp] once (16 consecutive pixels of one channel are then one
// contiguous load), then runs the output channels in blocks of kPixBlock, broadcasting each
// weight w[ky, kx, c, o] into its FMA; the epilogue (residual, ReLU) writes the NHWC output
// through a small [kO][16] tile.
constexpr int64_t kPixBlock = 16;
constexpr int64_t kPixMinRows = 4;  // output rows per task at least (see RunPix)

typedef float v16u __attribute__((vector_size(64), aligned(4)));

struct Planes {
  const float* data;
  int64_t wp, iy_lo;
};

// The last pass over a contiguous run of m output floats (whole pixels of every channel): +
// residual, ReLU, then the run copied out.
inline void FinishRun(const Geom& g, float* run, int64_t m, const float* res, float* out) {
  if (res)
    for (int64_t i = 0; i < m; ++i) run[i] += res[i];
  if (g.relu)
    for (int64_t i = 0; i < m; ++i) run[i] = run[i] > 0.0f ? run[i] : 0.0f;
  std::memcpy(out, run, sizeof(float) * m);
}

// Pixels [ix0, ix1) x channels [c0, c1) of an input row (NHWC, C channels) into the planes
// pr[c * wp + ix], float by float.
inline void RowToPlanesScalar(const float* xr, int64_t ix0, int64_t ix1, int64_t c0, int64_t c1,
                              int64_t C, int64_t wp, float* pr) {
  for (int64_t ix = ix0; ix < ix1; ++ix)
    for (int64_t c = c0; c < c1; ++c) pr[c * wp + ix] = xr[ix * C + c];
}

#ifdef __AVX512F__
// r[i][j] -> r[j][i] for a 16 x 16 block of floats held in 16 registers: pairs of rows
// interleaved (ps, then pd), which leaves each 128-bit lane of u[4i + k] holding column
// 4L + k of rows 4i..4i+3; two rounds of 128-bit lane shuffles gather those lanes.
__attribute__((always_inline)) inline void Transpose16(__m512 (&r)[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int k = 0; k < 4; ++k) {
    t[k] = _mm512_shuffle_f32x4(r[k], r[4 + k], 0x44);       // lanes 0, 1 of both
    t[4 + k] = _mm512_shuffle_f32x4(r[k], r[4 + k], 0xEE);   // lanes 2, 3
    t[8 + k] = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0x44);
    t[12 + k] = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0xEE);
  }
  for (int k = 0; k < 4; ++k) {
    r[k] = _mm512_shuffle_f32x4(t[k], t[8 + k], 0x88);          // lane 0 of each row group
    r[4 + k] = _mm512_shuffle_f32x4(t[k], t[8 + k], 0xDD);      // lane 1
    r[8 + k] = _mm512_shuffle_f32x4(t[4 + k], t[12 + k], 0x88);  // lane 2
    r[12 + k] = _mm512_shuffle_f32x4(t[4 + k], t[12 + k], 0xDD); // lane 3
  }
}

// Epilogue (below) from the accumulators (r[o], o < kO; the rest 0) through a register
// transpose, after which r[p] holds pixel p's channels: a whole-width block's pixels go into
// one run with plain overlapping stores, a narrower block's are masked stores (the same
// additions in the same order: equal to the last bit).
template <int kO>
__attribute__((always_inline)) inline void EpilogueV(const Geom& g, __m512 (&r)[16], int64_t n,
                                                     float* out, const float* res) {
  Transpose16(r);
  if (kO == g.O) {  // n pixels are one run of n * kO floats: overlapping stores, in order
    alignas(64) float run[16 * kO + 16];
    for (int64_t p = 0; p < n; ++p) _mm512_storeu_ps(run + p * kO, r[p]);
    FinishRun(g, run, n * kO, res, out);
    return;
  }
  const __mmask16 m = static_cast<__mmask16>((1u << kO) - 1u);
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t p = 0; p < n; ++p) {
    __m512 v = r[p];
    if (res) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, res + p * g.O));
    if (g.relu) v = _mm512_max_ps(v, zero);
    _mm512_mask_storeu_ps(out + p * g.O, m, v);
  }
}

// One input row of W pixels x C channels (NHWC) into C planes of pr[c * wp + ix], 16 pixels x
// 16 channels at a time through a register transpose; missing pixels and channels load as 0.
inline void RowToPlanes(const float* xr, int64_t W, int64_t C, int64_t wp, float* pr) {
  for (int64_t ix0 = 0; ix0 < W; ix0 += 16) {
    const int64_t np = std::min<int64_t>(16, W - ix0);
    for (int64_t c0 = 0; c0 < C; c0 += 16) {
      const int64_t nc = std::min<int64_t>(16, C - c0);
      if (nc < 8) {  // float by float: cheaper than a 16 x 16 transpose for few channels
        RowToPlanesScalar(xr, ix0, ix0 + np, c0, c0 + nc, C, wp, pr);
        continue;
      }
      const __mmask16 m = static_cast<__mmask16>((1u << nc) - 1u);
      __m512 r[16];
      for (int64_t p = 0; p < 16; ++p)
        r[p] = p < np ? _mm512_maskz_loadu_ps(m, xr + (ix0 + p) * C + c0) : _mm512_setzero_ps();
      Transpose16(r);
      for (int64_t c = 0; c < nc; ++c) _mm512_storeu_ps(pr + (c0 + c) * wp + ix0, r[c]);
    }
  }
}
#endif

// Writes n <= 16 consecutive output pixels of channels [o0, o0 + kO) from tile[o][p]: out and
// res point at the first pixel's channel o0 (pixel stride g.O). When the block covers every
// channel (kO == g.O) the n pixels are one contiguous run of n * kO floats: transposed through a
// buffer, then one vectorisable pass adds the residual and applies the ReLU.
template <int kO>
inline void Epilogue(const Geom& g, const float (&tile)[kO][16], int64_t n, float* out,
                     const float* res) {
  if (kO == g.O) {
    alignas(64) float run[16 * kO];
    for (int64_t p = 0; p < n; ++p)
      for (int o = 0; o < kO; ++o) run[p * kO + o] = tile[o][p];
    FinishRun(g, run, n * kO, res, out);
    return;
  }
  for (int64_t p = 0; p < n; ++p) {
    for (int o = 0; o < kO; ++o) {
      const float v = tile[o][p] + (res ? res[p * g.O + o] : 0.0f);
      out[p * g.O + o] = g.relu ? std::max(v, 0.0f) : v;
    }
  }
}

// How many 16-pixel tiles RowsPix computes together for kO output channels: with few channels
// one tile's kO accumulators are too few independent FMA chains to hide the FMA latency (one
// output channel: one chain), so kR tiles share each weight broadcast.
template <int kO>
constexpr int PixTilesAtOnce() { return kO <= 2 ? 4 : kO <= 10 ? 2 : 1; }

typedef float v8u __attribute__((vector_size(32), aligned(4)));

// Output channels [o0, o0 + kO) of output rows [oy0, oy1) of image b, a 16-lane tile at a time:
// 16 consecutive pixels of a row, or (kPair, an 8-pixel-wide output such as a CIFAR ResNet's
// last stage) two output rows of 8 pixels, consecutive in memory, so no lane is idle there
// either. kR tiles at once (PixTilesAtOnce).
template <int kO, bool kPair>
void RowsPix(const Geom& g, const Planes& pl, const float* w, const float* bias, float* out,
             int64_t b, int64_t oy0, int64_t oy1, int64_t o0) {
#ifndef __AVX512F__
  alignas(64) float tile[kO][16];
#endif
  constexpr int kR = PixTilesAtOnce<kO>();
  const int64_t per_row = kPair ? 1 : (g.Wo + 15) / 16;
  const int64_t total = kPair ? (oy1 - oy0 + 1) / 2 : (oy1 - oy0) * per_row;  // the task's tiles
  for (int64_t i0 = 0; i0 < total; i0 += kR) {
    const float* pa[kR];  // the tile's first input plane row (kPair: of each output row)
    const float* pb[kR];
    int64_t n[kR], out_off[kR];  // its pixels and its first output float
    for (int j = 0; j < kR; ++j) {  // past the last tile: the last tile again, not written
      const int64_t i = std::min<int64_t>(i0 + j, total - 1);
      if constexpr (kPair) {
        const int64_t oy = oy0 + 2 * i;
        const bool two = oy + 1 < oy1;
        const int64_t r0 = oy * g.sh - g.ph - pl.iy_lo;
        pa[j] = pl.data + r0 * g.C * pl.wp;
        pb[j] = pl.data + (two ? r0 + g.sh : r0) * g.C * pl.wp;  // a lone last row: twice
        n[j] = two ? 16 : 8;
        out_off[j] = (b * g.Ho + oy) * g.Wo * g.O + o0;
      } else {
        const int64_t oy = oy0 + i / per_row, ox0 = (i % per_row) * 16;
        pa[j] = pb[j] = pl.data + (oy * g.sh - g.ph - pl.iy_lo) * g.C * pl.wp + ox0;
        n[j] = std::min<int64_t>(16, g.Wo - ox0);
        out_off[j] = ((b * g.Ho + oy) * g.Wo + ox0) * g.O + o0;
      }
    }
    v16 acc[kR][kO];
    for (int j = 0; j < kR; ++j)
      for (int o = 0; o < kO; ++o) acc[j][o] = v16{} + (bias ? bias[o0 + o] : 0.0f);
    for (int64_t ky = 0; ky < g.kh; ++ky) {
      for (int64_t c = 0; c < g.C; ++c) {
        const int64_t off = (ky * g.C + c) * pl.wp;
        for (int64_t kx = 0; kx < g.kw; ++kx) {
          const float* wk = w + ((ky * g.kw + kx) * g.C + c) * g.O + o0;
          for (int j = 0; j < kR; ++j) {
            v16 xv;
            if constexpr (kPair) {
              const v8u lo = *reinterpret_cast<const v8u*>(pa[j] + off + kx);
              const v8u hi = *reinterpret_cast<const v8u*>(pb[j] + off + kx);
              xv = __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13,
                                           14, 15);
            } else {
              xv = *reinterpret_cast<const v16u*>(pa[j] + off + kx);
            }
            for (int o = 0; o < kO; ++o) acc[j][o] += xv * wk[o];
          }
        }
      }
    }
    for (int j = 0; j < kR && i0 + j < total; ++j) {
      const float* res = g.res ? g.res + out_off[j] : nullptr;
#ifdef __AVX512F__
      __m512 r[16];  // built here: acc passed by reference measured slower (kept in memory)
      for (int o = 0; o < 16; ++o) r[o] = o < kO ? (__m512)acc[j][o] : _mm512_setzero_ps();
      EpilogueV<kO>(g, r, n[j], out + out_off[j], res);
#else
      for (int o = 0; o < kO; ++o) std::memcpy(tile[o], &acc[j][o], sizeof(v16));
      Epilogue<kO>(g, tile, n[j], out + out_off[j], res);
#endif
    }
  }
}

template <int... kOs>
void RowsPixBlock(int64_t n, const Geom& g, const Planes& pl, const float* w, const float* bias,
                  float* out, int64_t b, int64_t oy0, int64_t oy1, int64_t o0,
                  std::integer_sequence<int, kOs...>) {
  // RowsPix<n, Wo == 8>, n in 1..kPixBlock
  if (g.Wo == 8)
    ((n == kOs + 1 ? (RowsPix<kOs + 1, true>(g, pl, w, bias, out, b, oy0, oy1, o0), 0) : 0), ...);
  else
    ((n == kOs + 1 ? (RowsPix<kOs + 1, false>(g, pl, w, bias, out, b, oy0, oy1, o0), 0) : 0),
     ...);
}

void RowsPixAll(const Geom& g, const float* x, const float* w, const float* bias, float* out,
                int64_t b, int64_t oy0, int64_t oy1) {
  const int64_t iy_lo = oy0 * g.sh - g.ph;
  const int64_t nr = (oy1 - 1) * g.sh + g.kh - oy0 * g.sh;
  const int64_t tiles = (g.Wo + 15) / 16;
  // loads reach position (tiles - 1) * 16 + kw - 1 + 15 of a plane; 16 floats of slack
  const int64_t wp = std::max<int64_t>(tiles * 16 + g.kw - 1, g.W + 2 * g.pw) + 16;
  thread_local std::vector<float> buf;
  buf.assign(nr * g.C * wp, 0.0f);
  for (int64_t r = 0; r < nr; ++r) {
    const int64_t iy = iy_lo + r;
    if (iy < 0 || iy >= g.H) continue;
    const float* xr = x + (b * g.H + iy) * g.W * g.C;
    float* pr = buf.data() + r * g.C * wp + g.pw;
#ifdef __AVX512F__
    RowToPlanes(xr, g.W, g.C, wp, pr);
#else
    RowToPlanesScalar(xr, 0, g.W, 0, g.C, g.C, wp, pr);
#endif
  }
  const Planes pl{buf.data(), wp, iy_lo};
  for (int64_t o0 = 0; o0 < g.O; o0 += kPixBlock)
    RowsPixBlock(std::min<int64_t>(kPixBlock, g.O - o0), g, pl, w, bias, out, b, oy0, oy1, o0,
                 std::make_integer_sequence<int, kPixBlock>{});
}

void RunPix(ffi::ThreadPool& pool, const Geom& g, const float* x, const float* w,
            const float* bias, float* out) {
  // A task transposes kh - sh more input rows than its output rows need (the window's halo):
  // as many rows per task as still leave ~4 tasks per thread (a whole image at batch 128, 4
  // rows at batch 1).
  const int64_t threads = pool.num_threads() + 1;
  const int64_t rows = std::clamp<int64_t>(g.B * g.Ho / (4 * threads), kPixMinRows, g.Ho);
  const int64_t per_b = (g.Ho + rows - 1) / rows;
  ParallelFor(pool, g.B * per_b, [&](int64_t i) {
    const int64_t b = i / per_b, oy0 = (i % per_b) * rows;
    RowsPixAll(g, x, w, bias, out, b, oy0, std::min<int64_t>(oy0 + rows, g.Ho));
  });
}

template <int kNV>
void Run(ffi::ThreadPool& pool, const Geom& g, const float* x, const float* w, const float* bias,
         float* out) {
  std::vector<v16> wp(g.kh * g.kw * g.C * kNV);
  std::memset(wp.data(), 0, wp.size() * sizeof(v16));
  float* wpf = reinterpret_cast<float*>(wp.data());
  const int64_t op = kNV * 16;
  for (int64_t k = 0; k < g.kh * g.kw * g.C; ++k)
    std::memcpy(wpf + k * op, w + k * g.O, sizeof(float) * g.O);
  v16 bv[kNV];
  std::memset(bv, 0, sizeof(bv));
  if (bias != nullptr) std::memcpy(bv, bias, sizeof(float) * g.O);
  ParallelFor(pool, g.B * g.Ho, [&](int64_t i) {
    Row<kNV>(g, x, wp.data(), bv, out, i / g.Ho, i % g.Ho);
  });
}

ffi::Error ConvImpl(ffi::ThreadPool pool, ffi::AnyBuffer X, ffi::AnyBuffer Wt, ffi::AnyBuffer Bias,
                    ffi::AnyBuffer Res, ffi::Result<ffi::AnyBuffer> Out,
                    ffi::Span<const int64_t> geom) {
  if (geom.size() != 7)
    return ffi::Error::InvalidArgument(
        "geom: sh, sw, ph, pw, relu, pixel path's max outputs, pixel path for odd widths");
  auto xd = X.dimensions(), wd = Wt.dimensions(), od = Out->dimensions();
  if (xd.size() != 4 || wd.size() != 4 || od.size() != 4)
    return ffi::Error::InvalidArgument("x, w and out must be rank 4 (NHWC, HWIO, NHWC)");
  Geom g{xd[0], xd[1], xd[2], xd[3], wd[3], od[1], od[2], wd[0], wd[1],
         geom[0], geom[1], geom[2], geom[3], geom[4] != 0, nullptr};
  if (Res.element_count() != 0) {
    if (Res.element_count() != Out->element_count())
      return ffi::Error::InvalidArgument("the residual must have the output's shape");
    g.res = Res.typed_data<float>();
  }
  if (wd[2] != g.C || od[0] != g.B || od[3] != g.O)
    return ffi::Error::InvalidArgument("shapes do not agree");
  if (g.O > 64) return ffi::Error::InvalidArgument("at most 64 output channels");
  const float* bias = Bias.element_count() == static_cast<size_t>(g.O)
                          ? Bias.typed_data<float>() : nullptr;
  const float* x = X.typed_data<float>();
  const float* w = Wt.typed_data<float>();
  float* out = Out->typed_data<float>();
  // the pixel path up to geom[5] outputs, and (geom[6]) for widths that are not a multiple of
  // 16, where a channel-vectorised convolution leaves lanes idle; rows >= 8 pixels
  const bool pixel = g.O <= geom[5] || (geom[6] != 0 && g.O % 16 != 0);
  if (pixel && g.sw == 1 && g.Wo >= 8) {
    RunPix(pool, g, x, w, bias, out);
    return ffi::Error::Success();
  }
#ifdef __AVX512F__
  if (g.O <= kDotMaxOut) {
    RunDot(pool, g, x, w, bias, out);
    return ffi::Error::Success();
  }
#endif
  if (g.O <= 16) Run<1>(pool, g, x, w, bias, out);
  else if (g.O <= 32) Run<2>(pool, g, x, w, bias, out);
  else if (g.O <= 48) Run<3>(pool, g, x, w, bias, out);
  else Run<4>(pool, g, x, w, bias, out);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MetapruneConvNhwc, ConvImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<ffi::Span<const int64_t>>("geom"));
