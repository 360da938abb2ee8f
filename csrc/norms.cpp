// CPU kernels for per-example gradient norms and clipped gradients.
//
// Same semantics as the torch references in vaultkern/ops/ (read those for the
// maths). Work is split into independent items (one tile of a chunk of
// examples); each item writes one partial sum per example into its own slot
// and an example's partials are added in a fixed order afterwards. Matrix
// products on tiles go through ATen (at::bmm_out into a per-thread buffer),
// i.e. the BLAS that torch links; inside at::parallel_for those calls run
// single-threaded. The number of threads only changes how examples are
// chunked into BLAS calls, so results agree across thread counts up to the
// rounding of the tile products.
//
// Inputs are detached: the results are plain numbers (no autograd graph), and
// the out= BLAS calls run on worker threads whose grad mode is not ours.
//
// Memory: nothing of size T×T or p×d is kept for the whole batch, only one
// tile (for a bounded chunk of examples) per worker thread.
#include "vaultkern.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace vaultkern {
namespace {

// Tile edges for T×T Gram tiles (ghost norms: small where symmetry lets a tile
// stand for its transpose, large otherwise) and the row budget of a tile of
// the per-example gradient (direct norms): a d×rows tile holds at most
// kDirectTileElems elements. Chosen with bench/cpu_kernels.py.
constexpr int64_t kGhostTile = 64;
constexpr int64_t kGhostTileNoSymmetry = 256;
constexpr int64_t kDirectTileElems = 1 << 16;
constexpr int64_t kCrossTile = 256;  // positions of the LM head per tile (embedding_linear_cross)
constexpr int64_t kChunkElems = 1 << 18;  // scratch elements per work item (examples × tile)

at::ScalarType acc_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_float_cpu(const at::Tensor& t, const char* fn, const char* name, int64_t dim) {
  VK_CHECK(t.device().is_cpu(), fn, ": ", name, " must be a CPU tensor, got device ", t.device());
  VK_CHECK(at::isFloatingType(t.scalar_type()), fn, ": ", name,
              " must be a floating-point tensor, got dtype ", t.scalar_type());
  VK_CHECK(t.dim() == dim, fn, ": ", name, " must have ", dim, " dimensions, got shape ", t.sizes());
}

inline at::Tensor ids_as_long(const at::Tensor& ids, const char* fn) {
  VK_CHECK(ids.device().is_cpu(), fn, ": ids must be a CPU tensor, got device ", ids.device());
  VK_CHECK(!at::isFloatingType(ids.scalar_type()) && ids.scalar_type() != at::kBool, fn,
              ": ids must be an integer tensor, got dtype ", ids.scalar_type());
  VK_CHECK(ids.dim() == 2, fn, ": ids must be [B, T], got shape ", ids.sizes());
  return ids.to(at::kLong).contiguous();
}

inline void check_same(int64_t x, int64_t y, const char* fn, const char* what) {
  VK_CHECK(x == y, fn, ": ", what, " differ (", x, " vs ", y, ")");
}

// Σ_k x[k]·y[k] in double, with 8 independent lanes so the compiler can
// vectorise it while the summation order stays fixed.
template <typename T>
double sum_of_products(const T* x, const T* y, int64_t n) {
  double lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t k = 0;
  for (; k + 8 <= n; k += 8)
    for (int l = 0; l < 8; ++l) lane[l] += double(x[k + l]) * double(y[k + l]);
  double s = 0;
  for (; k < n; ++k) s += double(x[k]) * double(y[k]);
  for (int l = 0; l < 8; ++l) s += lane[l];
  return s;
}

double sum_of_products(const at::Tensor& x, const at::Tensor& y) {
  if (x.scalar_type() == at::kDouble)
    return sum_of_products(x.data_ptr<double>(), y.data_ptr<double>(), x.numel());
  return sum_of_products(x.data_ptr<float>(), y.data_ptr<float>(), x.numel());
}

// out[i] = Σ_k partial[i·per + k], in k order, cast to out's dtype.
void reduce_partials(const std::vector<double>& partial, int64_t per, at::Tensor& out) {
  const int64_t B = out.numel();
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "reduce_partials", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    for (int64_t i = 0; i < B; ++i) {
      double s = 0;
      for (int64_t k = 0; k < per; ++k) s += partial[i * per + k];
      o[i] = static_cast<scalar_t>(s);
    }
  });
}

struct TilePair {
  int64_t t0, tn, s0, sn;
  double weight;
};

// Examples per work item: as many as fit kChunkElems scratch elements of
// `per_example` each, but few enough that there are at least as many items as
// threads (`tiles` items per chunk of examples).
int64_t examples_per_item(int64_t B, int64_t per_example, int64_t tiles) {
  const int64_t budget = std::max<int64_t>(1, kChunkElems / std::max<int64_t>(1, per_example));
  const int64_t threads = at::get_num_threads();
  // The fewest chunks that give every thread work and, where the batch allows,
  // the same number of items (equal-cost items: no thread idles at the end).
  int64_t chunks = (threads + tiles - 1) / tiles;
  for (int64_t c = chunks; c <= std::min(B, chunks + threads); ++c)
    if ((c * tiles) % threads == 0) {
      chunks = c;
      break;
    }
  return std::max<int64_t>(1, std::min(budget, (B + chunks - 1) / chunks));
}

// Per example i: Σ_{t,s} (x1_t·x2_s)(y1_t·y2_s), summed over T1×T2 tiles.
// When `symmetric` (x1 = x2, y1 = y2) only tiles with t-tile ≤ s-tile are
// computed; an off-diagonal tile stands for itself and its transpose (×2).
// A work item is one tile pair for a chunk of examples (one bmm per factor).
void ghost_products(const at::Tensor& x1, const at::Tensor& y1, const at::Tensor& x2,
                    const at::Tensor& y2, bool symmetric, at::Tensor& out) {
  const int64_t B = x1.size(0), T1 = x1.size(1), T2 = x2.size(1);
  // Small tiles only pay where they skip work (the symmetric case); otherwise
  // large tiles keep the BLAS calls efficient.
  const int64_t edge = symmetric ? kGhostTile : kGhostTileNoSymmetry;
  std::vector<TilePair> tiles;
  for (int64_t t0 = 0; t0 < T1; t0 += edge)
    for (int64_t s0 = symmetric ? t0 : 0; s0 < T2; s0 += edge)
      tiles.push_back({t0, std::min(edge, T1 - t0), s0, std::min(edge, T2 - s0),
                       symmetric && s0 != t0 ? 2.0 : 1.0});
  const int64_t per = static_cast<int64_t>(tiles.size());
  const int64_t tile_elems = std::min(edge, T1) * std::min(edge, T2);
  const int64_t cb = examples_per_item(B, tile_elems, per), chunks = (B + cb - 1) / cb;
  std::vector<double> partial(B * per, 0.0);
  at::parallel_for(0, chunks * per, 1, [&](int64_t begin, int64_t end) {
    at::Tensor bx = at::empty({cb * tile_elems}, x1.options());
    at::Tensor by = at::empty({cb * tile_elems}, x1.options());
    for (int64_t k = begin; k < end; ++k) {
      const int64_t c0 = (k / per) * cb, cn = std::min(cb, B - c0), pair = k % per;
      const TilePair& tp = tiles[pair];
      const int64_t n = tp.tn * tp.sn;
      at::Tensor gx = bx.narrow(0, 0, cn * n).view({cn, tp.tn, tp.sn});
      at::Tensor gy = by.narrow(0, 0, cn * n).view({cn, tp.tn, tp.sn});
      at::bmm_out(gx, x1.narrow(0, c0, cn).narrow(1, tp.t0, tp.tn),
                  x2.narrow(0, c0, cn).narrow(1, tp.s0, tp.sn).transpose(1, 2));
      at::bmm_out(gy, y1.narrow(0, c0, cn).narrow(1, tp.t0, tp.tn),
                  y2.narrow(0, c0, cn).narrow(1, tp.s0, tp.sn).transpose(1, 2));
      for (int64_t e = 0; e < cn; ++e)
        partial[(c0 + e) * per + pair] = tp.weight * sum_of_products(gx[e], gy[e]);
    }
  });
  reduce_partials(partial, per, out);
}

// Per example i: <y1ᵀx1, y2ᵀx2> (Frobenius), formed a block of rows of the
// p×d gradient at a time: rows P of y1ᵀx1 are (x1ᵀ y1[:, P])ᵀ, a d×|P| tile.
// `same` (x1 = x2, y1 = y2): the squared norm, one product per tile.
void direct_products(const at::Tensor& x1, const at::Tensor& y1, const at::Tensor& x2,
                     const at::Tensor& y2, bool same, at::Tensor& out) {
  const int64_t B = x1.size(0), d = x1.size(2), p = y1.size(2);
  const int64_t rows =
      std::max<int64_t>(8, std::min<int64_t>(p, kDirectTileElems / std::max<int64_t>(d, 1)));
  const int64_t per = (p + rows - 1) / rows;
  const int64_t cb = examples_per_item(B, d * rows, per), chunks = (B + cb - 1) / cb;
  std::vector<double> partial(B * per, 0.0);
  at::parallel_for(0, chunks * per, 1, [&](int64_t begin, int64_t end) {
    at::Tensor b1 = at::empty({cb * d * rows}, x1.options());
    at::Tensor b2 = same ? b1 : at::empty({cb * d * rows}, x1.options());
    for (int64_t k = begin; k < end; ++k) {
      const int64_t c0 = (k / per) * cb, cn = std::min(cb, B - c0), tile = k % per;
      const int64_t r0 = tile * rows, rn = std::min(rows, p - r0);
      at::Tensor c1 = b1.narrow(0, 0, cn * d * rn).view({cn, d, rn});
      at::bmm_out(c1, x1.narrow(0, c0, cn).transpose(1, 2), y1.narrow(0, c0, cn).narrow(2, r0, rn));
      at::Tensor c2 = c1;
      if (!same) {
        c2 = b2.narrow(0, 0, cn * d * rn).view({cn, d, rn});
        at::bmm_out(c2, x2.narrow(0, c0, cn).transpose(1, 2), y2.narrow(0, c0, cn).narrow(2, r0, rn));
      }
      for (int64_t e = 0; e < cn; ++e)
        partial[(c0 + e) * per + tile] = sum_of_products(c1[e], c2[e]);
    }
  });
  reduce_partials(partial, per, out);
}

// The distinct valid ids (>= 0) of one example in increasing order and, for
// each, the sum of the rows at the positions holding it: Ê_v = Σ_{t: x_t = v} row_t.
template <typename in_t, typename acc_t>
void group_rows(const int64_t* ids, int64_t T, const in_t* rows, int64_t d,
                std::vector<int64_t>& uniq, std::vector<acc_t>& sums) {
  std::vector<int64_t> order;
  order.reserve(T);
  for (int64_t t = 0; t < T; ++t)
    if (ids[t] >= 0) order.push_back(t);
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return ids[x] < ids[y]; });
  uniq.clear();
  sums.clear();
  acc_t* row = nullptr;
  for (int64_t t : order) {
    if (uniq.empty() || uniq.back() != ids[t]) {
      uniq.push_back(ids[t]);
      sums.resize(uniq.size() * d, acc_t(0));
      row = sums.data() + (uniq.size() - 1) * d;
    }
    const in_t* src = rows + t * d;
    for (int64_t c = 0; c < d; ++c) row[c] += static_cast<acc_t>(src[c]);
  }
}

}  // namespace

// ---------------------------------------------------------------------------
// linear_norm_sq(a [B,T,d], g [B,T,p], mode) -> [B]:  ‖g_iᵀ a_i‖²_F
// ---------------------------------------------------------------------------
at::Tensor linear_norm_sq(const at::Tensor& a, const at::Tensor& g, const std::string& mode) {
  const char* fn = "linear_norm_sq";
  check_float_cpu(a, fn, "a", 3);
  check_float_cpu(g, fn, "g", 3);
  check_same(a.size(0), g.size(0), fn, "batch sizes of a and g");
  check_same(a.size(1), g.size(1), fn, "positions T of a and g");
  VK_CHECK(mode == "ghost" || mode == "direct", fn, ": mode must be 'ghost' or 'direct', got '",
              mode, "'");
  const auto acc = acc_type(a);
  at::Tensor out = at::zeros({a.size(0)}, a.options().dtype(acc));
  if (a.numel() == 0 || g.numel() == 0) return out;
  at::Tensor x = a.detach().to(acc).contiguous(), y = g.detach().to(acc).contiguous();
  if (mode == "ghost")
    ghost_products(x, y, x, y, /*symmetric=*/true, out);
  else
    direct_products(x, y, x, y, /*same=*/true, out);
  return out;
}

// ---------------------------------------------------------------------------
// linear_cross(a1 [B,T1,d], g1 [B,T1,p], a2 [B,T2,d], g2 [B,T2,p]) -> [B]
//   = <g1ᵀa1, g2ᵀa2> = Σ_{t,s} (a1_t·a2_s)(g1_t·g2_s); ghost when 2·T1·T2 < d·p
//   (the same rule as the torch reference), direct otherwise.
// ---------------------------------------------------------------------------
at::Tensor linear_cross(const at::Tensor& a1, const at::Tensor& g1, const at::Tensor& a2,
                        const at::Tensor& g2) {
  const char* fn = "linear_cross";
  check_float_cpu(a1, fn, "a1", 3);
  check_float_cpu(g1, fn, "g1", 3);
  check_float_cpu(a2, fn, "a2", 3);
  check_float_cpu(g2, fn, "g2", 3);
  const int64_t B = a1.size(0), T1 = a1.size(1), T2 = a2.size(1), d = a1.size(2), p = g1.size(2);
  check_same(g1.size(0), B, fn, "batch sizes of g1 and a1");
  check_same(a2.size(0), B, fn, "batch sizes of a2 and a1");
  check_same(g2.size(0), B, fn, "batch sizes of g2 and a1");
  check_same(g1.size(1), T1, fn, "positions of g1 and a1");
  check_same(g2.size(1), T2, fn, "positions of g2 and a2");
  check_same(a2.size(2), d, fn, "input widths d of a1 and a2");
  check_same(g2.size(2), p, fn, "output widths p of g1 and g2");
  const auto acc = acc_type(a1);
  at::Tensor out = at::zeros({B}, a1.options().dtype(acc));
  if (B == 0 || T1 == 0 || T2 == 0 || d == 0 || p == 0) return out;
  at::Tensor x1 = a1.detach().to(acc).contiguous(), y1 = g1.detach().to(acc).contiguous();
  at::Tensor x2 = a2.detach().to(acc).contiguous(), y2 = g2.detach().to(acc).contiguous();
  if (2 * T1 * T2 < d * p)
    ghost_products(x1, y1, x2, y2, /*symmetric=*/false, out);
  else
    direct_products(x1, y1, x2, y2, /*same=*/false, out);
  return out;
}

// ---------------------------------------------------------------------------
// embedding_norm_sq(ids [B,T], g [B,T,d]) -> [B]:  Σ_v ‖Σ_{t: x_t = v} g_t‖²
// Per example: sort the valid positions by id, sum the gradient rows of each
// run of equal ids (in double), add the squared norms.
// ---------------------------------------------------------------------------
at::Tensor embedding_norm_sq(const at::Tensor& ids_in, const at::Tensor& g_in) {
  const char* fn = "embedding_norm_sq";
  at::Tensor ids = ids_as_long(ids_in, fn);
  check_float_cpu(g_in, fn, "g", 3);
  const int64_t B = ids.size(0), T = ids.size(1), d = g_in.size(2);
  check_same(g_in.size(0), B, fn, "batch sizes of ids and g");
  check_same(g_in.size(1), T, fn, "positions of ids and g");
  at::Tensor g = g_in.contiguous();
  std::vector<double> norms(B, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "embedding_norm_sq", [&] {
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const int64_t* ip = ids.data_ptr<int64_t>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<int64_t> uniq;
      std::vector<double> sums;
      for (int64_t i = begin; i < end; ++i) {
        group_rows<scalar_t, double>(ip + i * T, T, gp + i * T * d, d, uniq, sums);
        norms[i] = sum_of_products(sums.data(), sums.data(), static_cast<int64_t>(sums.size()));
      }
    });
  });
  at::Tensor out = at::empty({B}, g.options().dtype(acc_type(g)));
  reduce_partials(norms, 1, out);
  return out;
}

// ---------------------------------------------------------------------------
// embedding_linear_cross(ids [B,T1], e [B,T1,d], h [B,T2,d], z [B,T2,V]) -> [B]
//   = Σ_{t,s} z_s[x_t] (e_t·h_s) = Σ_u Σ_s z_s[v_u] (Ê_u·h_s)
// with Ê_u the sum of the rows e_t whose id is the u-th distinct id v_u: the
// products h_s·Ê_u are a U×T2 matrix (U ≤ T1, fewer with repeated ids) and
// only the U×T2 needed entries of z are read.
// ---------------------------------------------------------------------------
at::Tensor embedding_linear_cross(const at::Tensor& ids_in, const at::Tensor& e_in,
                                  const at::Tensor& h_in, const at::Tensor& z_in) {
  const char* fn = "embedding_linear_cross";
  at::Tensor ids = ids_as_long(ids_in, fn);
  check_float_cpu(e_in, fn, "e", 3);
  check_float_cpu(h_in, fn, "h", 3);
  check_float_cpu(z_in, fn, "z", 3);
  const int64_t B = ids.size(0), T1 = ids.size(1), d = e_in.size(2);
  const int64_t T2 = h_in.size(1), V = z_in.size(2);
  check_same(e_in.size(0), B, fn, "batch sizes of e and ids");
  check_same(e_in.size(1), T1, fn, "positions of e and ids");
  check_same(h_in.size(0), B, fn, "batch sizes of h and ids");
  check_same(h_in.size(2), d, fn, "widths d of e and h");
  check_same(z_in.size(0), B, fn, "batch sizes of z and ids");
  check_same(z_in.size(1), T2, fn, "positions of z and h");
  {
    const int64_t* ip = ids.data_ptr<int64_t>();
    for (int64_t k = 0; k < ids.numel(); ++k)
      VK_CHECK(ip[k] < V, fn, ": id ", ip[k], " at flat position ", k,
                  " is out of range for the head's output width V=", V);
  }
  const auto acc = acc_type(e_in);
  at::Tensor out = at::zeros({B}, e_in.options().dtype(acc));
  if (B == 0 || T1 == 0 || T2 == 0 || d == 0) return out;
  at::Tensor e = e_in.contiguous(), h = h_in.detach().to(acc).contiguous(), z = z_in.contiguous();
  const int64_t* ip = ids.data_ptr<int64_t>();
  const int64_t per = (T2 + kCrossTile - 1) / kCrossTile;

  AT_DISPATCH_FLOATING_TYPES(acc, "embedding_linear_cross", [&] {
    using acc_t = scalar_t;
    at::Tensor ehat = at::zeros({B, T1, d}, h.options());  // Ê_i in rows 0..U_i-1, zeros after
    acc_t* hp = ehat.data_ptr<acc_t>();
    std::vector<std::vector<int64_t>> uniq(B);
    std::vector<double> partial(B * per, 0.0);
    const int64_t sn_max = std::min(kCrossTile, T2);
    const int64_t cb = examples_per_item(B, T1 * sn_max, 1), chunks = (B + cb - 1) / cb;
    // z, e: any float dtype, read element by element (z can be large: never copied).
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "embedding_linear_cross", [&] {
      using z_t = scalar_t;
      const z_t* zp = z.data_ptr<z_t>();
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, e.scalar_type(), "embedding_linear_cross", [&] {
        const scalar_t* ep = e.data_ptr<scalar_t>();
        // One work item per chunk of examples.
        at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
          at::Tensor buf = at::empty({cb * T1 * sn_max}, h.options());
          std::vector<acc_t> sums;
          for (int64_t chunk = begin; chunk < end; ++chunk) {
            const int64_t c0 = chunk * cb, cn = std::min(cb, B - c0);
            int64_t umax = 0;  // distinct ids v_u and summed rows Ê_u of each example
            for (int64_t i = c0; i < c0 + cn; ++i) {
              group_rows<scalar_t, acc_t>(ip + i * T1, T1, ep + i * T1 * d, d, uniq[i], sums);
              std::copy(sums.begin(), sums.end(), hp + i * T1 * d);
              umax = std::max<int64_t>(umax, uniq[i].size());
            }
            if (umax == 0) continue;
            for (int64_t tile = 0; tile < per; ++tile) {
              // m[i, s, u] = h_is·Ê_iu for s in the tile, u < umax: one bmm for the chunk.
              const int64_t s0 = tile * kCrossTile, sn = std::min(kCrossTile, T2 - s0);
              at::Tensor m = buf.narrow(0, 0, cn * sn * umax).view({cn, sn, umax});
              at::bmm_out(m, h.narrow(0, c0, cn).narrow(1, s0, sn),
                          ehat.narrow(0, c0, cn).narrow(1, 0, umax).transpose(1, 2));
              const acc_t* mp = m.data_ptr<acc_t>();
              for (int64_t i = c0; i < c0 + cn; ++i) {  // Σ_s Σ_{u<U_i} m[i,s,u]·z[i,s,v_u]
                const int64_t U = static_cast<int64_t>(uniq[i].size());
                const int64_t* vu = uniq[i].data();
                const acc_t* mi = mp + (i - c0) * sn * umax;
                double total = 0;
                for (int64_t c = 0; c < sn; ++c) {  // one row of z at a time (cache friendly)
                  const z_t* zrow = zp + (i * T2 + s0 + c) * V;
                  const acc_t* mrow = mi + c * umax;
                  double lane[4] = {0, 0, 0, 0};  // independent sums: no add-latency chain
                  int64_t u = 0;
                  const z_t* znext = c + 1 < sn ? zrow + V : zrow;  // warm the next row's entries
                  for (; u + 4 <= U; u += 4) {
                    for (int l = 0; l < 4; ++l) __builtin_prefetch(znext + vu[u + l]);
                    for (int l = 0; l < 4; ++l) lane[l] += double(mrow[u + l]) * double(zrow[vu[u + l]]);
                  }
                  for (; u < U; ++u) lane[0] += double(mrow[u]) * double(zrow[vu[u]]);
                  total += (lane[0] + lane[1]) + (lane[2] + lane[3]);
                }
                partial[i * per + tile] = total;
              }
            }
          }
        });
      });
    });
    reduce_partials(partial, per, out);
  });
  return out;
}

// ---------------------------------------------------------------------------
// clipped_embedding_grad(ids [B,T], g [B,T,d], clip [B], V) -> [V, d]
//   row v = Σ_{(i,t): x_it = v} clip_i g_it   (ids < 0 skipped)
// The (i,t) entries are bucketed by id (counting sort, stable), then rows are
// formed in parallel, each by one thread in (i,t) order and in double.
// ---------------------------------------------------------------------------
at::Tensor clipped_embedding_grad(const at::Tensor& ids_in, const at::Tensor& g_in,
                                  const at::Tensor& clip_in, int64_t num_embeddings) {
  const char* fn = "clipped_embedding_grad";
  at::Tensor ids = ids_as_long(ids_in, fn);
  check_float_cpu(g_in, fn, "g", 3);
  VK_CHECK(clip_in.device().is_cpu(), fn, ": clip must be a CPU tensor, got device ", clip_in.device());
  VK_CHECK(num_embeddings >= 0, fn, ": num_embeddings must be >= 0, got ", num_embeddings);
  const int64_t B = ids.size(0), T = ids.size(1), d = g_in.size(2), V = num_embeddings;
  check_same(g_in.size(0), B, fn, "batch sizes of ids and g");
  check_same(g_in.size(1), T, fn, "positions of ids and g");
  VK_CHECK(clip_in.dim() == 1 && clip_in.size(0) == B, fn, ": clip must have shape [", B,
              "], got ", clip_in.sizes());
  const auto acc = acc_type(g_in);
  at::Tensor out = at::zeros({V, d}, g_in.options().dtype(acc));
  const int64_t N = B * T;
  if (N == 0 || d == 0) return out;

  const int64_t* ip = ids.data_ptr<int64_t>();
  std::vector<int64_t> start(V + 1, 0);
  for (int64_t n = 0; n < N; ++n) {
    const int64_t v = ip[n];
    VK_CHECK(v < V, fn, ": id ", v, " at [", n / T, ", ", n % T,
                "] is out of range for num_embeddings=", V);
    if (v >= 0) ++start[v + 1];
  }
  std::vector<int64_t> rows_used;
  for (int64_t v = 0; v < V; ++v) {
    if (start[v + 1] > 0) rows_used.push_back(v);
    start[v + 1] += start[v];
  }
  std::vector<int64_t> entries(start[V]), fill(start.begin(), start.end() - 1);
  for (int64_t n = 0; n < N; ++n)
    if (ip[n] >= 0) entries[fill[ip[n]]++] = n;

  at::Tensor clip = clip_in.to(at::kDouble).contiguous();
  const double* cp = clip.data_ptr<double>();
  at::Tensor g = g_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "clipped_embedding_grad", [&] {
    const scalar_t* gp = g.data_ptr<scalar_t>();
    AT_DISPATCH_FLOATING_TYPES(acc, "clipped_embedding_grad", [&] {
      using acc_t = scalar_t;
      acc_t* op = out.data_ptr<acc_t>();
      const int64_t U = static_cast<int64_t>(rows_used.size());
      at::parallel_for(0, U, 16, [&](int64_t begin, int64_t end) {
        std::vector<double> row(d);
        for (int64_t u = begin; u < end; ++u) {
          const int64_t v = rows_used[u];
          std::fill(row.begin(), row.end(), 0.0);
          for (int64_t k = start[v]; k < start[v + 1]; ++k) {
            const int64_t n = entries[k];
            const double c = cp[n / T];
            const auto* src = gp + n * d;
            for (int64_t j = 0; j < d; ++j) row[j] += c * double(src[j]);
          }
          for (int64_t j = 0; j < d; ++j) op[v * d + j] = static_cast<acc_t>(row[j]);
        }
      });
    });
  });
  return out;
}

}  // namespace vaultkern
