// Single-pass CPU kernels for the metanetwork's dense edge blocks (metaprune_jax.metanet_blocks),
// built and registered with XLA by metaprune_jax.cpu_kernels.
//
// A layer's grid groups each hold an edge tensor E [B, S, R, H] (B blocks, two node axes and the
// hidden width); the nodes' factors are [N, H] tables. The XLA path computes the same maths
// (metanet_blocks._grid_fwd_math, _grid_update, _grid_bwd_math, _combine) as a chain of fusions
// that stream E and its temporaries through memory many times per layer, plus per-block gathers
// and per-node reductions. Here one call does a whole layer: one pass over every E for the
// forward (both passes' statistics, their max/min tie counts and the updated edges, each node's
// statistics combined across its blocks) and one pass over E and its cotangent for the backward.
//
// Work is split into items (block b, chunk of kChunk rows of S) run on the caller and XLA's
// intra-op thread pool. A chunk's statistics over S are accumulated in S order into a slab of
// its own, and each node's slabs are combined in (group, block, chunk) order afterwards, so
// the results depend only on the data and the graph, never on the number of threads or lanes.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "parallel_for.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kChunk = 64;

using metaprune_cpu::ParallelFor;

struct Dims {
  int64_t B, S, R, H;
};

// Running max/min with tie counts (strict IEEE comparisons; E holds no NaN).
inline void MaxCount(float p, float& m, float& c) {
  bool gt = p > m, eq = p == m;
  c = gt ? 1.0f : (eq ? c + 1.0f : c);
  m = gt ? p : m;
}
inline void MinCount(float p, float& m, float& c) {
  bool lt = p < m, eq = p == m;
  c = lt ? 1.0f : (eq ? c + 1.0f : c);
  m = lt ? p : m;
}

// Statistic slots: sum, sum of squares, max, min, max ties, min ties; each [n, H].
constexpr int kStats = 6;

void InitStats(float* st, int64_t n, int64_t H) {
  const float inf = std::numeric_limits<float>::infinity();
  std::fill(st, st + n * H, 0.0f);
  std::fill(st + 1 * n * H, st + 2 * n * H, 0.0f);
  std::fill(st + 2 * n * H, st + 3 * n * H, -inf);
  std::fill(st + 3 * n * H, st + 4 * n * H, inf);
  std::fill(st + 4 * n * H, st + 6 * n * H, 0.0f);
}

// One (s, r) row of the forward. st1: this r's pass-1 slots (stride m1 between slots);
// acc2: this s's pass-2 accumulators (stride H).
template <bool kCounts, bool kValidS, bool kValidR>
inline void FwdRow(int64_t H, const float* __restrict e, const float* __restrict a1s,
                   const float* __restrict a3s, const float* __restrict a4s,
                   const float* __restrict a1r, const float* __restrict a3r,
                   const float* __restrict a4r, float* __restrict st1, int64_t m1,
                   float* __restrict acc2, float* __restrict out) {
  float* __restrict s1 = st1;
  float* __restrict q1 = st1 + m1;
  float* __restrict x1 = st1 + 2 * m1;
  float* __restrict n1 = st1 + 3 * m1;
  float* __restrict cx1 = st1 + 4 * m1;
  float* __restrict cn1 = st1 + 5 * m1;
  float* __restrict s2 = acc2;
  float* __restrict q2 = acc2 + H;
  float* __restrict x2 = acc2 + 2 * H;
  float* __restrict n2 = acc2 + 3 * H;
  float* __restrict cx2 = acc2 + 4 * H;
  float* __restrict cn2 = acc2 + 5 * H;
#pragma GCC ivdep
  for (int64_t h = 0; h < H; ++h) {
    float x = e[h];
    float p1 = a1s[h] * x;
    s1[h] += p1;
    q1[h] += p1 * p1;
    if (kValidS && kCounts) {
      MaxCount(p1, x1[h], cx1[h]);
      MinCount(p1, n1[h], cn1[h]);
    } else if (kValidS) {
      x1[h] = p1 > x1[h] ? p1 : x1[h];
      n1[h] = p1 < n1[h] ? p1 : n1[h];
    }
    float p2 = a1r[h] * x;
    s2[h] += p2;
    q2[h] += p2 * p2;
    if (kValidR && kCounts) {
      MaxCount(p2, x2[h], cx2[h]);
      MinCount(p2, n2[h], cn2[h]);
    } else if (kValidR) {
      x2[h] = p2 > x2[h] ? p2 : x2[h];
      n2[h] = p2 < n2[h] ? p2 : n2[h];
    }
    out[h] = x * (1.0f + a3s[h] * a4r[h] + a3r[h] * a4s[h]);
  }
}

// GCC vector extensions (lowered to the target's widest vectors: one AVX-512 register, two AVX2
// ones, ...): 16 floats, unaligned and aliasing float memory.
typedef float V16 __attribute__((vector_size(64), aligned(4), may_alias));
typedef int32_t I16 __attribute__((vector_size(64), aligned(4), may_alias));
constexpr int64_t kLanes = 16;
constexpr int64_t kTile = 8;  // S rows sharing one load of the statistics over S

inline V16 Ld(const float* p) { return *reinterpret_cast<const V16*>(p); }
inline void St(float* p, V16 x) { *reinterpret_cast<V16*>(p) = x; }

// The forward of rows [s_lo, s_hi) x [0, R) of one block, for H a multiple of kLanes: the same
// operations in the same order as FwdRow row by row (the same bits), but S rows taken kTile at a
// time for each R row, so that the statistics over S (acc1, one row per R row, slots m1 apart)
// are loaded and stored once per tile rather than once per (s, r) row. acc2(s) points at S row
// s's statistics over R (slots `st2` apart); e(s, r) / out(s, r) at the rows of E and En.
template <bool kCounts>
void FwdTiles(int64_t H, int64_t s_lo, int64_t s_hi, int64_t R, const float* __restrict e,
              float* __restrict out, const float* const* a1s, const float* const* a3s,
              const float* const* a4s, const bool* vs, const float* const* a1r,
              const float* const* a3r, const float* const* a4r, const bool* vr,
              float* __restrict acc1, int64_t m1, float* const* acc2, int64_t st2) {
  const V16 one = {1.0f, 1.0f, 1.0f, 1.0f, 1.0f, 1.0f, 1.0f, 1.0f,
                   1.0f, 1.0f, 1.0f, 1.0f, 1.0f, 1.0f, 1.0f, 1.0f};
  for (int64_t t0 = s_lo; t0 < s_hi; t0 += kTile) {
    const int64_t t1 = std::min(s_hi, t0 + kTile);
    for (int64_t r = 0; r < R; ++r) {
      float* row1 = acc1 + r * H;
      for (int64_t h = 0; h < H; h += kLanes) {
        V16 s1 = Ld(row1 + h), q1 = Ld(row1 + m1 + h), x1 = Ld(row1 + 2 * m1 + h),
            n1 = Ld(row1 + 3 * m1 + h);
        V16 cx1 = {}, cn1 = {};
        if (kCounts) cx1 = Ld(row1 + 4 * m1 + h), cn1 = Ld(row1 + 5 * m1 + h);
        const V16 b1 = Ld(a1r[r] + h), b3 = Ld(a3r[r] + h), b4 = Ld(a4r[r] + h);
        for (int64_t s = t0; s < t1; ++s) {
          const int64_t off = (s * R + r) * H + h;
          const V16 x = Ld(e + off);
          const V16 p1 = Ld(a1s[s] + h) * x;
          s1 += p1;
          q1 += p1 * p1;
          if (vs[s]) {
            if (kCounts) {
              I16 gt = p1 > x1, eq = p1 == x1;
              cx1 = gt ? one : (eq ? cx1 + one : cx1);
              I16 lt = p1 < n1, eq2 = p1 == n1;
              cn1 = lt ? one : (eq2 ? cn1 + one : cn1);
            }
            x1 = p1 > x1 ? p1 : x1;
            n1 = p1 < n1 ? p1 : n1;
          }
          const V16 p2 = b1 * x;
          float* a2 = acc2[s] + h;
          St(a2, Ld(a2) + p2);
          St(a2 + st2, Ld(a2 + st2) + p2 * p2);
          if (vr[r]) {
            V16 x2 = Ld(a2 + 2 * st2), n2 = Ld(a2 + 3 * st2);
            if (kCounts) {
              V16 cx2 = Ld(a2 + 4 * st2), cn2 = Ld(a2 + 5 * st2);
              I16 gt = p2 > x2, eq = p2 == x2;
              St(a2 + 4 * st2, gt ? one : (eq ? cx2 + one : cx2));
              I16 lt = p2 < n2, eq2 = p2 == n2;
              St(a2 + 5 * st2, lt ? one : (eq2 ? cn2 + one : cn2));
            }
            St(a2 + 2 * st2, p2 > x2 ? p2 : x2);
            St(a2 + 3 * st2, p2 < n2 ? p2 : n2);
          }
          St(out + off, x * (one + Ld(a3s[s] + h) * b4 + b3 * Ld(a4s[s] + h)));
        }
        St(row1 + h, s1);
        St(row1 + m1 + h, q1);
        St(row1 + 2 * m1 + h, x1);
        St(row1 + 3 * m1 + h, n1);
        if (kCounts) St(row1 + 4 * m1 + h, cx1), St(row1 + 5 * m1 + h, cn1);
      }
    }
  }
}

// One (s, r) row of the backward. n1: this r's pass-1 node terms (gs, gq, max, min, max
// weight, min weight; stride m1), n2: this s's pass-2 terms (stride m2); d1: this r's
// accumulators (da1r, da3r, da4r; stride md1), d2: this s's (da1s, da3s, da4s; stride H).
template <bool kValidS, bool kValidR>
inline void BwdRow(int64_t H, const float* __restrict e, const float* __restrict ge,
                   const float* __restrict a1s, const float* __restrict a3s,
                   const float* __restrict a4s, const float* __restrict a1r,
                   const float* __restrict a3r, const float* __restrict a4r,
                   const float* __restrict n1, int64_t m1, const float* __restrict n2,
                   int64_t m2, float* __restrict d1, int64_t md1, float* __restrict d2,
                   float* __restrict de) {
  const float *gs1 = n1, *gq1 = n1 + m1, *mx1 = n1 + 2 * m1, *mn1 = n1 + 3 * m1,
              *wx1 = n1 + 4 * m1, *wn1 = n1 + 5 * m1;
  const float *gs2 = n2, *gq2 = n2 + m2, *mx2 = n2 + 2 * m2, *mn2 = n2 + 3 * m2,
              *wx2 = n2 + 4 * m2, *wn2 = n2 + 5 * m2;
  float* __restrict d1a = d1;
  float* __restrict d1b = d1 + md1;
  float* __restrict d1c = d1 + 2 * md1;
  float* __restrict d2a = d2;
  float* __restrict d2b = d2 + H;
  float* __restrict d2c = d2 + 2 * H;
#pragma GCC ivdep
  for (int64_t h = 0; h < H; ++h) {
    float x = e[h], g = ge[h];
    float p1 = a1s[h] * x;
    float dp1 = gs1[h] + 2.0f * p1 * gq1[h];
    if (kValidS) {
      dp1 += (p1 == mx1[h] ? wx1[h] : 0.0f);
      dp1 += (p1 == mn1[h] ? wn1[h] : 0.0f);
    }
    float p2 = a1r[h] * x;
    float dp2 = gs2[h] + 2.0f * p2 * gq2[h];
    if (kValidR) {
      dp2 += (p2 == mx2[h] ? wx2[h] : 0.0f);
      dp2 += (p2 == mn2[h] ? wn2[h] : 0.0f);
    }
    float fac = 1.0f + a3s[h] * a4r[h] + a3r[h] * a4s[h];
    de[h] = g * fac + a1s[h] * dp1 + a1r[h] * dp2;
    float t = g * x;
    d2a[h] += x * dp1;
    d2b[h] += t * a4r[h];
    d2c[h] += t * a3r[h];
    d1a[h] += x * dp2;
    d1b[h] += t * a4s[h];
    d1c[h] += t * a3s[h];
  }
}

constexpr int kGrads = 3;

// The backward of rows [s_lo, s_hi) x [0, R) of one block, for H a multiple of kLanes: BwdRow's
// operations in BwdRow's order (the same bits), S rows taken kTile at a time for each R row so
// that R row r's node terms n1 (slots m1 apart) and accumulators d1 (slots md1 apart) are loaded
// once per tile. n2(s) / d2(s) point at S row s's node terms (slots m2 apart) and accumulators
// (slots `sd2` apart).
void BwdTiles(int64_t H, int64_t s_lo, int64_t s_hi, int64_t R, const float* __restrict e,
              const float* __restrict ge, float* __restrict de, const float* const* a1s,
              const float* const* a3s, const float* const* a4s, const bool* vs,
              const float* const* a1r, const float* const* a3r, const float* const* a4r,
              const bool* vr, const float* const* n1, int64_t m1, const float* const* n2,
              int64_t m2, float* __restrict d1, int64_t md1, float* const* d2, int64_t sd2) {
  const V16 one = {1.0f, 1.0f, 1.0f, 1.0f, 1.0f, 1.0f, 1.0f, 1.0f,
                   1.0f, 1.0f, 1.0f, 1.0f, 1.0f, 1.0f, 1.0f, 1.0f};
  const V16 zero = {};
  for (int64_t t0 = s_lo; t0 < s_hi; t0 += kTile) {
    const int64_t t1 = std::min(s_hi, t0 + kTile);
    for (int64_t r = 0; r < R; ++r) {
      const float* nr = n1[r];
      float* row1 = d1 + r * H;
      for (int64_t h = 0; h < H; h += kLanes) {
        const V16 gs1 = Ld(nr + h), gq1 = Ld(nr + m1 + h), mx1 = Ld(nr + 2 * m1 + h),
                  mn1 = Ld(nr + 3 * m1 + h), wx1 = Ld(nr + 4 * m1 + h), wn1 = Ld(nr + 5 * m1 + h);
        const V16 b1 = Ld(a1r[r] + h), b3 = Ld(a3r[r] + h), b4 = Ld(a4r[r] + h);
        V16 d1a = Ld(row1 + h), d1b = Ld(row1 + md1 + h), d1c = Ld(row1 + 2 * md1 + h);
        for (int64_t s = t0; s < t1; ++s) {
          const int64_t off = (s * R + r) * H + h;
          const V16 x = Ld(e + off), g = Ld(ge + off);
          const V16 c1 = Ld(a1s[s] + h), c3 = Ld(a3s[s] + h), c4 = Ld(a4s[s] + h);
          const V16 p1 = c1 * x;
          V16 dp1 = gs1 + 2.0f * p1 * gq1;
          if (vs[s]) {
            dp1 += (p1 == mx1) ? wx1 : zero;
            dp1 += (p1 == mn1) ? wn1 : zero;
          }
          const float* ns = n2[s] + h;
          const V16 p2 = b1 * x;
          V16 dp2 = Ld(ns) + 2.0f * p2 * Ld(ns + m2);
          if (vr[r]) {
            dp2 += (p2 == Ld(ns + 2 * m2)) ? Ld(ns + 4 * m2) : zero;
            dp2 += (p2 == Ld(ns + 3 * m2)) ? Ld(ns + 5 * m2) : zero;
          }
          const V16 fac = one + c3 * b4 + b3 * c4;
          St(de + off, g * fac + c1 * dp1 + b1 * dp2);
          const V16 t = g * x;
          float* acc = d2[s] + h;
          St(acc, Ld(acc) + x * dp1);
          St(acc + sd2, Ld(acc + sd2) + t * b4);
          St(acc + 2 * sd2, Ld(acc + 2 * sd2) + t * b3);
          d1a += x * dp2;
          d1b += t * c4;
          d1c += t * c3;
        }
        St(row1 + h, d1a);
        St(row1 + md1 + h, d1b);
        St(row1 + 2 * md1 + h, d1c);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Whole-layer kernels: every grid group of one metanetwork layer in one call, with each node's
// statistics combined across its blocks (the XLA path's per-node gathers and reductions).
//
// The node factors come from [N, H] tables (A1 already zero at invalid nodes, A3, A4), the
// validity from V [N] (> 0: valid). Group g has E_g [B_g, S_g, R_g, H]; its block b has its S
// rows at nodes s0 + s and its R rows at nodes r0 + r, with, per group, B_g S offsets and then
// B_g R offsets in the `offs` attribute. A block's partial statistics go to scratch slabs (per
// 64-row S chunk for the statistics over S); each node's partials are then combined in (group,
// block, chunk) order, so a node's result depends only on the graph, never on the threads.
// Leading axes shared by every operand and result (vmapped lanes) are looped over.
// ---------------------------------------------------------------------------------------------

// Scratch of at least n floats, kept by the calling thread from call to call: a fresh
// allocation of the layer kernels' few MB was page-faulted in on every call.
float* Scratch(int64_t n) {
  thread_local std::vector<float> buf;
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(n);
  return buf.data();
}

struct BlockRef {
  int64_t g, b;
};

struct LayerGeom {
  int64_t lanes = 1, N = 0, H = 0;
  std::vector<Dims> dims;  // per group (B, S, R, H)
  std::vector<const int64_t*> s0, r0;
  std::vector<int64_t> nch;
  std::vector<int64_t> item0;  // first item of each group (items: block x S chunk)
  int64_t items = 0;
  // Per node: the blocks holding it among their R rows (1) and among their S rows (2).
  std::vector<int64_t> ptr1, ptr2;
  std::vector<BlockRef> ent1, ent2;
  // Scratch layout (Layout): per lane, for each group, slab 1 (per block and chunk, [slots, R,
  // H]: the accumulators of the R rows over a chunk's S rows), then slab 2 (per block, [slots,
  // S, H]: the S rows' accumulators over R).
  int64_t slots = 0, per_lane = 0;
  std::vector<int64_t> slab1, slab2;

  void Layout(int64_t n_slots) {
    slots = n_slots;
    per_lane = 0;
    for (size_t g = 0; g < dims.size(); ++g) {
      slab1.push_back(per_lane);
      per_lane += dims[g].B * nch[g] * slots * dims[g].R * H;
      slab2.push_back(per_lane);
      per_lane += dims[g].B * slots * dims[g].S * H;
    }
  }
  // Slab 1 of (group g, block b, chunk c) and slab 2 of (g, b), in a lane's scratch `base`.
  float* Slab1(float* base, int64_t g, int64_t b, int64_t c) const {
    return base + slab1[g] + (b * nch[g] + c) * slots * dims[g].R * H;
  }
  float* Slab2(float* base, int64_t g, int64_t b) const {
    return base + slab2[g] + b * slots * dims[g].S * H;
  }

  struct Item {
    int64_t lane, g, b, c;
    int64_t so, ro;        // the block's first S and R node
    int64_t off;           // the block's first element in its group's edge tensor
    int64_t s_lo, s_hi;    // the chunk's S rows
  };
  // Work item `it` of lanes * items: (lane, group, block, S chunk).
  Item Decode(int64_t it) const {
    Item out{it / items, 0, 0, 0, 0, 0, 0, 0, 0};
    int64_t rest = it % items;
    while (out.g + 1 < static_cast<int64_t>(dims.size()) && item0[out.g + 1] <= rest) ++out.g;
    rest -= item0[out.g];
    const Dims& d = dims[out.g];
    out.b = rest / nch[out.g];
    out.c = rest % nch[out.g];
    out.so = s0[out.g][out.b];
    out.ro = r0[out.g][out.b];
    out.off = (out.lane * d.B + out.b) * d.S * d.R * H;
    out.s_lo = out.c * kChunk;
    out.s_hi = std::min(d.S, out.s_lo + kChunk);
    return out;
  }
};

// The node tables A1, A3, A4 [..., N, H] and V [..., N] of one lane.
struct NodeTables {
  const float *a1, *a3, *a4, *v;
  NodeTables(const ffi::AnyBuffer& A1, const ffi::AnyBuffer& A3, const ffi::AnyBuffer& A4,
             const ffi::AnyBuffer& V)
      : a1(A1.typed_data<float>()), a3(A3.typed_data<float>()), a4(A4.typed_data<float>()),
        v(V.typed_data<float>()) {}
  NodeTables Lane(int64_t lane, int64_t N, int64_t H) const {
    NodeTables t = *this;
    t.a1 += lane * N * H, t.a3 += lane * N * H, t.a4 += lane * N * H, t.v += lane * N;
    return t;
  }
};

// Geometry of A1 [..., N, H] and the G edge tensors Es[first + g] [..., B, S, R, H].
ffi::Error MakeGeom(const ffi::AnyBuffer& a1, const ffi::RemainingArgs& es, size_t first,
                    size_t G, ffi::Span<const int64_t> offs, LayerGeom& geo) {
  auto ad = a1.dimensions();
  if (ad.size() < 2) return ffi::Error::InvalidArgument("node tables must have rank >= 2");
  const size_t lead = ad.size() - 2;
  for (size_t i = 0; i < lead; ++i) geo.lanes *= ad[i];
  geo.N = ad[lead];
  geo.H = ad[lead + 1];
  size_t used = 0;
  for (size_t g = 0; g < G; ++g) {
    auto e = es.get<ffi::AnyBuffer>(first + g);
    if (e.has_error()) return e.error();
    auto d = e->dimensions();
    if (d.size() != lead + 4 || d[lead + 3] != geo.H)
      return ffi::Error::InvalidArgument("edge tensors must be [..., B, S, R, H] with the "
                                         "node tables' leading axes and H");
    for (size_t i = 0; i < lead; ++i)
      if (d[i] != ad[i]) return ffi::Error::InvalidArgument("leading axes differ");
    Dims dm{d[lead], d[lead + 1], d[lead + 2], geo.H};
    if (used + 2 * dm.B > offs.size())
      return ffi::Error::InvalidArgument("offs is shorter than the groups' blocks");
    const int64_t* so = offs.begin() + used;
    const int64_t* ro = so + dm.B;
    for (int64_t b = 0; b < dm.B; ++b)
      if (so[b] < 0 || so[b] + dm.S > geo.N || ro[b] < 0 || ro[b] + dm.R > geo.N)
        return ffi::Error::InvalidArgument("a block's node range is outside the node tables");
    used += 2 * dm.B;
    geo.dims.push_back(dm);
    geo.s0.push_back(so);
    geo.r0.push_back(ro);
    geo.nch.push_back((dm.S + kChunk - 1) / kChunk);
    geo.item0.push_back(geo.items);
    geo.items += dm.B * geo.nch.back();
  }
  if (used != offs.size()) return ffi::Error::InvalidArgument("offs is longer than the blocks");
  auto lists = [&](bool role1, std::vector<int64_t>& ptr, std::vector<BlockRef>& ent) {
    ptr.assign(geo.N + 1, 0);
    for (size_t g = 0; g < G; ++g)
      for (int64_t b = 0; b < geo.dims[g].B; ++b) {
        const int64_t lo = role1 ? geo.r0[g][b] : geo.s0[g][b];
        const int64_t n = role1 ? geo.dims[g].R : geo.dims[g].S;
        for (int64_t i = lo; i < lo + n; ++i) ++ptr[i + 1];
      }
    for (int64_t i = 0; i < geo.N; ++i) ptr[i + 1] += ptr[i];
    ent.resize(ptr[geo.N]);
    std::vector<int64_t> fill(ptr.begin(), ptr.end() - 1);
    for (size_t g = 0; g < G; ++g)
      for (int64_t b = 0; b < geo.dims[g].B; ++b) {
        const int64_t lo = role1 ? geo.r0[g][b] : geo.s0[g][b];
        const int64_t n = role1 ? geo.dims[g].R : geo.dims[g].S;
        for (int64_t i = lo; i < lo + n; ++i) ent[fill[i]++] = {int64_t(g), b};
      }
  };
  lists(true, geo.ptr1, geo.ent1);
  lists(false, geo.ptr2, geo.ent2);
  return ffi::Error::Success();
}

// dst (one row; slots dst_stride apart) <- combination of dst and src (slots src_stride apart).
template <bool kCounts>
inline void CombineRow(float* __restrict dst, int64_t ds, const float* __restrict src,
                       int64_t ss, int64_t H) {
  for (int64_t h = 0; h < H; ++h) {
    dst[h] += src[h];
    dst[ds + h] += src[ss + h];
  }
  for (int64_t h = 0; h < H; ++h) {
    float a = dst[2 * ds + h], b = src[2 * ss + h];
    if (kCounts) {
      float ca = dst[4 * ds + h], cb = src[4 * ss + h];
      dst[4 * ds + h] = a > b ? ca : (a == b ? ca + cb : cb);
    }
    dst[2 * ds + h] = a > b ? a : b;
    a = dst[3 * ds + h], b = src[3 * ss + h];
    if (kCounts) {
      float ca = dst[5 * ds + h], cb = src[5 * ss + h];
      dst[5 * ds + h] = a < b ? ca : (a == b ? ca + cb : cb);
    }
    dst[3 * ds + h] = a < b ? a : b;
  }
}

// Neutral statistics (0, 0, -inf, +inf, 0, 0) in one row whose slots are `stride` apart.
inline void InitRow(float* st, int64_t stride, int64_t H) {
  const float inf = std::numeric_limits<float>::infinity();
  for (int64_t h = 0; h < H; ++h) {
    st[h] = 0.0f;
    st[stride + h] = 0.0f;
    st[2 * stride + h] = -inf;
    st[3 * stride + h] = inf;
    st[4 * stride + h] = 0.0f;
    st[5 * stride + h] = 0.0f;
  }
}

// One block's rows for the tiled loops: pointers to the factor rows (a1, a3, a4) and the
// validity of its S rows [s_lo, s_hi) and of all its R rows.
struct BlockRows {
  std::vector<const float*> s1, s3, s4, r1, r3, r4;
  std::unique_ptr<bool[]> vs, vr;
  BlockRows(int64_t S, int64_t R, int64_t s_lo, int64_t s_hi, int64_t so, int64_t ro,
            int64_t H, const float* a1, const float* a3, const float* a4, const float* v)
      : s1(S), s3(S), s4(S), r1(R), r3(R), r4(R), vs(new bool[S]), vr(new bool[R]) {
    for (int64_t s = s_lo; s < s_hi; ++s) {
      const int64_t n = so + s;
      s1[s] = a1 + n * H, s3[s] = a3 + n * H, s4[s] = a4 + n * H;
      vs[s] = v[n] > 0;
    }
    for (int64_t r = 0; r < R; ++r) {
      const int64_t n = ro + r;
      r1[r] = a1 + n * H, r3[r] = a3 + n * H, r4[r] = a4 + n * H;
      vr[r] = v[n] > 0;
    }
  }
};

constexpr int64_t kNodeChunk = 32;  // nodes per item of the combining loops

// Forward of a layer. Operands: A1, A3, A4 [..., N, H], V [..., N], then E_g [..., B, S, R, H]
// per group. Results: T1 [..., 6, N, H]: at each node, the statistics (as GridFwdImpl's st1) of
// every message p1 = A1[s node] * E over the S rows of every block holding the node among its
// R rows (messages from valid S nodes); T2 [..., 6, N, H]: the same of p2 = A1[r node] * E over
// the R rows of every block holding the node among its S rows; then En_g per group. A node no
// block reaches gets (0, 0, -inf, +inf, 0, 0).
template <bool kCounts>
ffi::Error LayerFwdImpl(ffi::ThreadPool pool, ffi::AnyBuffer A1, ffi::AnyBuffer A3,
                        ffi::AnyBuffer A4, ffi::AnyBuffer V, ffi::RemainingArgs Es,
                        ffi::Result<ffi::AnyBuffer> T1, ffi::Result<ffi::AnyBuffer> T2,
                        ffi::RemainingRets Ens, ffi::Span<const int64_t> offs) {
  const size_t G = Es.size();
  if (Ens.size() != G) return ffi::Error::InvalidArgument("one En per edge tensor");
  LayerGeom geo;
  if (auto err = MakeGeom(A1, Es, 0, G, offs, geo); err.failure()) return err;
  const int64_t N = geo.N, H = geo.H, NH = N * H;
  std::vector<const float*> e(G);
  std::vector<float*> en(G);
  for (size_t g = 0; g < G; ++g) {
    e[g] = Es.get<ffi::AnyBuffer>(g)->typed_data<float>();
    auto r = Ens.get<ffi::AnyBuffer>(g);
    if (r.has_error()) return r.error();
    en[g] = (*r)->typed_data<float>();
  }
  geo.Layout(kStats);
  const int64_t per_lane = geo.per_lane;
  float* scratch = Scratch(std::max<int64_t>(1, geo.lanes * per_lane));
  const NodeTables tables(A1, A3, A4, V);
  float* t1 = T1->typed_data<float>();
  float* t2 = T2->typed_data<float>();

  ParallelFor(pool, geo.lanes * geo.items, [&](int64_t it) {
    const auto [lane, g, b, c, so, ro, off_b, s_lo, s_hi] = geo.Decode(it);
    const int64_t S = geo.dims[g].S, R = geo.dims[g].R, m1 = R * H;
    const NodeTables lt = tables.Lane(lane, N, H);
    const float *la1 = lt.a1, *la3 = lt.a3, *la4 = lt.a4, *lv = lt.v;
    float* base = scratch + lane * per_lane;
    float* acc1 = geo.Slab1(base, g, b, c);
    InitStats(acc1, R, H);
    const float* eb = e[g] + off_b;
    float* enb = en[g] + off_b;
    if (H % kLanes == 0) {
      const BlockRows rows(S, R, s_lo, s_hi, so, ro, H, la1, la3, la4, lv);
      std::vector<float*> pa2(S);
      for (int64_t s = s_lo; s < s_hi; ++s) {
        pa2[s] = geo.Slab2(base, g, b) + s * H;
        InitRow(pa2[s], S * H, H);
      }
      FwdTiles<kCounts>(H, s_lo, s_hi, R, eb, enb, rows.s1.data(), rows.s3.data(),
                        rows.s4.data(), rows.vs.get(), rows.r1.data(), rows.r3.data(),
                        rows.r4.data(), rows.vr.get(), acc1, m1, pa2.data(), S * H);
      return;
    }
    for (int64_t s = s_lo; s < s_hi; ++s) {
      float* acc2 = geo.Slab2(base, g, b) + s * H;  // slot k at + k * S * H
      float tmp[kStats * 256];
      std::vector<float> big;
      float* a2 = tmp;
      if (H > 256) {
        big.resize(kStats * H);
        a2 = big.data();
      }
      InitStats(a2, 1, H);
      const int64_t ns = so + s;
      const bool vs_ok = lv[ns] > 0;
      const float *p1s = la1 + ns * H, *p3s = la3 + ns * H, *p4s = la4 + ns * H;
      for (int64_t r = 0; r < R; ++r) {
        const int64_t nr = ro + r;
        const bool vr_ok = lv[nr] > 0;
        const float* er = eb + (s * R + r) * H;
        float* out = enb + (s * R + r) * H;
        const float *p1r = la1 + nr * H, *p3r = la3 + nr * H, *p4r = la4 + nr * H;
        float* row1 = acc1 + r * H;
        if (vs_ok && vr_ok)
          FwdRow<kCounts, true, true>(H, er, p1s, p3s, p4s, p1r, p3r, p4r, row1, m1, a2, out);
        else if (vs_ok)
          FwdRow<kCounts, true, false>(H, er, p1s, p3s, p4s, p1r, p3r, p4r, row1, m1, a2, out);
        else if (vr_ok)
          FwdRow<kCounts, false, true>(H, er, p1s, p3s, p4s, p1r, p3r, p4r, row1, m1, a2, out);
        else
          FwdRow<kCounts, false, false>(H, er, p1s, p3s, p4s, p1r, p3r, p4r, row1, m1, a2, out);
      }
      for (int k = 0; k < kStats; ++k)
        std::memcpy(acc2 + k * S * H, a2 + k * H, H * sizeof(float));
    }
  });

  const int64_t node_items = (N + kNodeChunk - 1) / kNodeChunk;
  ParallelFor(pool, geo.lanes * node_items, [&](int64_t it) {
    const int64_t lane = it / node_items;
    const int64_t n_lo = (it % node_items) * kNodeChunk, n_hi = std::min(N, n_lo + kNodeChunk);
    float* base = scratch + lane * per_lane;
    float* lt1 = t1 + lane * kStats * NH;
    float* lt2 = t2 + lane * kStats * NH;
    for (int64_t n = n_lo; n < n_hi; ++n) {
      float* dst1 = lt1 + n * H;
      InitRow(dst1, NH, H);
      for (int64_t k = geo.ptr1[n]; k < geo.ptr1[n + 1]; ++k) {
        const auto [g, b] = geo.ent1[k];
        const Dims& d = geo.dims[g];
        const int64_t r = n - geo.r0[g][b];
        for (int64_t c = 0; c < geo.nch[g]; ++c)
          CombineRow<kCounts>(dst1, NH, geo.Slab1(base, g, b, c) + r * H, d.R * H, H);
      }
      float* dst2 = lt2 + n * H;
      InitRow(dst2, NH, H);
      for (int64_t k = geo.ptr2[n]; k < geo.ptr2[n + 1]; ++k) {
        const auto [g, b] = geo.ent2[k];
        const Dims& d = geo.dims[g];
        const int64_t s = n - geo.s0[g][b];
        CombineRow<kCounts>(dst2, NH, geo.Slab2(base, g, b) + s * H, d.S * H, H);
      }
    }
  });
  return ffi::Error::Success();
}

// Backward of a layer. Operands: A1, A3, A4, V (as the forward); N1 [..., 6, N, H]: per node,
// the cotangents of T1's sum and sum of squares, T1's max and min, and their cotangents divided
// by the tie counts; N2 the same for T2; then E_g per group and gEn_g per group. Results: dA
// [..., 3, N, H] (cotangents of A1, A3, A4, each node's block terms summed in a fixed order),
// then dE_g per group.
ffi::Error LayerBwdImpl(ffi::ThreadPool pool, ffi::AnyBuffer A1, ffi::AnyBuffer A3,
                        ffi::AnyBuffer A4, ffi::AnyBuffer V, ffi::AnyBuffer N1,
                        ffi::AnyBuffer N2, ffi::RemainingArgs Rest,
                        ffi::Result<ffi::AnyBuffer> DA, ffi::RemainingRets DEs,
                        ffi::Span<const int64_t> offs) {
  if (Rest.size() % 2) return ffi::Error::InvalidArgument("need E and gEn per group");
  const size_t G = Rest.size() / 2;
  if (DEs.size() != G) return ffi::Error::InvalidArgument("one dE per edge tensor");
  LayerGeom geo;
  if (auto err = MakeGeom(A1, Rest, 0, G, offs, geo); err.failure()) return err;
  const int64_t N = geo.N, H = geo.H, NH = N * H;
  std::vector<const float*> e(G), ge(G);
  std::vector<float*> de(G);
  for (size_t g = 0; g < G; ++g) {
    e[g] = Rest.get<ffi::AnyBuffer>(g)->typed_data<float>();
    auto gb = Rest.get<ffi::AnyBuffer>(G + g);
    if (gb.has_error()) return gb.error();
    if (gb->dimensions().size() != Rest.get<ffi::AnyBuffer>(g)->dimensions().size())
      return ffi::Error::InvalidArgument("gEn must have E's shape");
    ge[g] = gb->typed_data<float>();
    auto r = DEs.get<ffi::AnyBuffer>(g);
    if (r.has_error()) return r.error();
    de[g] = (*r)->typed_data<float>();
  }
  geo.Layout(kGrads);
  const int64_t per_lane = geo.per_lane;
  float* scratch = Scratch(std::max<int64_t>(1, geo.lanes * per_lane));
  const NodeTables tables(A1, A3, A4, V);
  const float* n1 = N1.typed_data<float>();
  const float* n2 = N2.typed_data<float>();
  float* da = DA->typed_data<float>();

  ParallelFor(pool, geo.lanes * geo.items, [&](int64_t it) {
    const auto [lane, g, b, c, so, ro, off_b, s_lo, s_hi] = geo.Decode(it);
    const int64_t S = geo.dims[g].S, R = geo.dims[g].R, m1 = R * H;
    const NodeTables lt = tables.Lane(lane, N, H);
    const float *la1 = lt.a1, *la3 = lt.a3, *la4 = lt.a4, *lv = lt.v;
    const float *ln1 = n1 + lane * kStats * NH, *ln2 = n2 + lane * kStats * NH;
    float* base = scratch + lane * per_lane;
    float* acc1 = geo.Slab1(base, g, b, c);
    std::fill(acc1, acc1 + kGrads * m1, 0.0f);
    if (H % kLanes == 0) {
      const BlockRows rows(S, R, s_lo, s_hi, so, ro, H, la1, la3, la4, lv);
      std::vector<const float*> pn1(R), pn2(S);
      std::vector<float*> pd2(S);
      for (int64_t s = s_lo; s < s_hi; ++s) {
        pn2[s] = ln2 + (so + s) * H;
        pd2[s] = geo.Slab2(base, g, b) + s * H;
        for (int k = 0; k < kGrads; ++k) std::fill(pd2[s] + k * S * H, pd2[s] + k * S * H + H, 0.0f);
      }
      for (int64_t r = 0; r < R; ++r) pn1[r] = ln1 + (ro + r) * H;
      BwdTiles(H, s_lo, s_hi, R, e[g] + off_b, ge[g] + off_b, de[g] + off_b, rows.s1.data(),
               rows.s3.data(), rows.s4.data(), rows.vs.get(), rows.r1.data(), rows.r3.data(),
               rows.r4.data(), rows.vr.get(), pn1.data(), NH, pn2.data(), NH, acc1, m1,
               pd2.data(), S * H);
      return;
    }
    for (int64_t s = s_lo; s < s_hi; ++s) {
      float* acc2 = geo.Slab2(base, g, b) + s * H;  // slot k at + k * S * H
      float tmp[kGrads * 256];
      std::vector<float> big;
      float* a2 = tmp;
      if (H > 256) {
        big.resize(kGrads * H);
        a2 = big.data();
      }
      std::fill(a2, a2 + kGrads * H, 0.0f);
      const int64_t ns = so + s;
      const bool vs_ok = lv[ns] > 0;
      const float *p1s = la1 + ns * H, *p3s = la3 + ns * H, *p4s = la4 + ns * H;
      const float* n2s = ln2 + ns * H;
      for (int64_t r = 0; r < R; ++r) {
        const int64_t nr = ro + r;
        const bool vr_ok = lv[nr] > 0;
        const int64_t off = off_b + (s * R + r) * H;
        const float *p1r = la1 + nr * H, *p3r = la3 + nr * H, *p4r = la4 + nr * H;
        const float* n1r = ln1 + nr * H;
        float* row1 = acc1 + r * H;
        const float *ee = e[g] + off, *gg = ge[g] + off;
        float* dd = de[g] + off;
        if (vs_ok && vr_ok)
          BwdRow<true, true>(H, ee, gg, p1s, p3s, p4s, p1r, p3r, p4r, n1r, NH, n2s, NH, row1,
                             m1, a2, dd);
        else if (vs_ok)
          BwdRow<true, false>(H, ee, gg, p1s, p3s, p4s, p1r, p3r, p4r, n1r, NH, n2s, NH, row1,
                              m1, a2, dd);
        else if (vr_ok)
          BwdRow<false, true>(H, ee, gg, p1s, p3s, p4s, p1r, p3r, p4r, n1r, NH, n2s, NH, row1,
                              m1, a2, dd);
        else
          BwdRow<false, false>(H, ee, gg, p1s, p3s, p4s, p1r, p3r, p4r, n1r, NH, n2s, NH, row1,
                               m1, a2, dd);
      }
      for (int k = 0; k < kGrads; ++k)
        std::memcpy(acc2 + k * S * H, a2 + k * H, H * sizeof(float));
    }
  });

  // Each node: its R-row terms (blocks in order, chunks in order), then its S-row terms.
  const int64_t node_items = (N + kNodeChunk - 1) / kNodeChunk;
  ParallelFor(pool, geo.lanes * node_items, [&](int64_t it) {
    const int64_t lane = it / node_items;
    const int64_t n_lo = (it % node_items) * kNodeChunk, n_hi = std::min(N, n_lo + kNodeChunk);
    float* base = scratch + lane * per_lane;
    float* lda = da + lane * kGrads * NH;
    for (int64_t n = n_lo; n < n_hi; ++n) {
      float* dst = lda + n * H;
      for (int k = 0; k < kGrads; ++k) std::fill(dst + k * NH, dst + k * NH + H, 0.0f);
      for (int64_t k = geo.ptr1[n]; k < geo.ptr1[n + 1]; ++k) {
        const auto [g, b] = geo.ent1[k];
        const Dims& d = geo.dims[g];
        const int64_t r = n - geo.r0[g][b];
        for (int64_t c = 0; c < geo.nch[g]; ++c) {
          const float* src = geo.Slab1(base, g, b, c) + r * H;
          for (int q = 0; q < kGrads; ++q)
            for (int64_t h = 0; h < H; ++h) dst[q * NH + h] += src[q * d.R * H + h];
        }
      }
      for (int64_t k = geo.ptr2[n]; k < geo.ptr2[n + 1]; ++k) {
        const auto [g, b] = geo.ent2[k];
        const Dims& d = geo.dims[g];
        const int64_t s = n - geo.s0[g][b];
        const float* src = geo.Slab2(base, g, b) + s * H;
        for (int q = 0; q < kGrads; ++q)
          for (int64_t h = 0; h < H; ++h) dst[q * NH + h] += src[q * d.S * H + h];
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

// The whole-layer kernels' bindings.
static auto LayerFwdBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>()
      .RemainingArgs()
      .Ret<ffi::AnyBuffer>()
      .Ret<ffi::AnyBuffer>()
      .RemainingRets()
      .Attr<ffi::Span<const int64_t>>("offs");
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(MetapruneLayerFwd, LayerFwdImpl<true>, LayerFwdBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(MetapruneLayerFwdNoCounts, LayerFwdImpl<false>, LayerFwdBinding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MetapruneLayerBwd, LayerBwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .RemainingArgs()
                                  .Ret<ffi::AnyBuffer>()
                                  .RemainingRets()
                                  .Attr<ffi::Span<const int64_t>>("offs"));
