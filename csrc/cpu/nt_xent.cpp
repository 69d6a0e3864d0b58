// Multi-view NT-Xent, CPU (docs/MATH.md section 4, docs/KERNEL_CONTRACT.md), without the [n, N] logits.
//
// Rows are normalised once into float32 U (O(N d) extra). Each thread owns blocks of kRowBlock rows and
// walks the columns in tiles of kColTile: a tile of logits S = U_rows U_cols^T / tau ([rows, cols],
// 256 KiB, cache resident) comes from BLAS, the few excluded entries of each row (the row itself, or all
// rows of its image) are set to -inf, and an online max / sum-exp per row absorbs the tile. The V-1
// positive logits are direct dot products. The backward pass recomputes each tile, turns it into
// G = c (V-1) exp(S - lse) / tau on the denominator set, and feeds two more GEMMs:
//   dU_rows[block] += G U_cols[tile],   dU_cols[tile] += G^T U_rows[block]   (a private dU_cols per thread)
// or, on machines with many threads, a second column-parallel pass for dU_cols (see nt_xent_bwd_cpu).
// The positive part of G is sparse (V-1 entries per row) and is applied with axpys. Last, both dU go
// back through the row normalisation. With cols_grad false (detached columns, RoCL's similarity) only
// dU_rows is computed: 2 GEMMs per tile (the logits, dU_rows) instead of 3 (private) or 4 (split).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "checks.h"
#include "vec_kernels.h"

namespace urkle_fast::cpu {
namespace {

constexpr const char* kFwd = "nt_xent_fwd_native";
constexpr const char* kBwd = "nt_xent_bwd_native";
constexpr int64_t kRowBlock = 128;  // rows of a logits tile
constexpr int64_t kColTile = 512;   // columns of a logits tile: 128 x 512 float32 = 256 KiB
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// ------------------------------------------------------------------------------------------------ GEMM
// C[m, n] = beta * C + alpha * op(A) op(B), all row-major float32 with leading dimensions; op(X) = X or X^T.
// Goes through at::addmm_out on views, so it runs on ATen's BLAS (MKL here); inside at::parallel_for
// BLAS runs on the calling thread only.
at::Tensor view(const float* p, int64_t rows, int64_t cols, int64_t ld, bool transposed) {
  auto opts = at::TensorOptions().dtype(at::kFloat).device(at::kCPU);
  auto* q = const_cast<float*>(p);
  if (!transposed) {
    return at::from_blob(q, {rows, cols}, {ld, 1}, opts);
  }
  return at::from_blob(q, {cols, rows}, {ld, 1}, opts).t();  // stored [cols, rows]
}

void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* A, int64_t lda,
          const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  at::Tensor a = view(A, m, k, lda, ta);
  at::Tensor b = view(B, k, n, ldb, tb);
  at::Tensor c = view(C, m, n, ldc, false);
  at::addmm_out(c, c, a, b, beta, alpha);
}

// --------------------------------------------------------------------------------------------- checks

struct Problem {
  int64_t n, N, d, V, B, row_offset;
  float inv_tau;
  int denominator;
};

Problem check_problem(const char* fn, const at::Tensor& z_rows, const at::Tensor& z_cols, int64_t views,
                      double temperature, int64_t denominator, int64_t row_offset) {
  check_dim(fn, "z_rows", z_rows, 2, "[n, d]");
  check_dim(fn, "z_cols", z_cols, 2, "[N, d]");
  check_device(fn, "z_rows", z_rows, c10::DeviceType::CPU);
  check_float_dtype(fn, "z_rows", z_rows);
  TORCH_CHECK(z_cols.scalar_type() == z_rows.scalar_type(), fn, ": z_cols must have the dtype of z_rows (",
              z_rows.scalar_type(), "), got ", z_cols.scalar_type());
  TORCH_CHECK(z_cols.device() == z_rows.device(), fn, ": z_cols must be on the device of z_rows (",
              z_rows.device(), "), got ", z_cols.device());
  TORCH_CHECK(z_cols.size(1) == z_rows.size(1), fn, ": z_cols must have d = z_rows.size(1) = ", z_rows.size(1),
              " columns, got shape ", z_cols.sizes());
  TORCH_CHECK(views >= 2, fn, ": views must be >= 2, got ", views);
  const int64_t N = z_cols.size(0), n = z_rows.size(0);
  TORCH_CHECK(N % views == 0, fn, ": views must divide z_cols.size(0) = N, got N=", N, ", views=", views);
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, fn, ": temperature must be finite and > 0, got ",
              temperature);
  TORCH_CHECK(denominator == 0 || denominator == 1, fn,
              ": denominator must be 0 (all) or 1 (negatives), got ", denominator);
  TORCH_CHECK(row_offset >= 0 && row_offset + n <= N, fn, ": row_offset must satisfy 0 <= row_offset and ",
              "row_offset + n <= N (n = z_rows.size(0) = ", n, ", N = z_cols.size(0) = ", N, "), got row_offset=",
              row_offset);
  Problem p;
  p.n = n;
  p.N = N;
  p.d = z_rows.size(1);
  p.V = views;
  p.B = N / views;
  p.row_offset = row_offset;
  p.inv_tau = static_cast<float>(1.0 / temperature);
  p.denominator = static_cast<int>(denominator);
  return p;
}

// ------------------------------------------------------------------------------------- normalised rows

struct Normalised {
  at::Tensor u_cols, inv_cols;  // [N, d], [N] float32
  at::Tensor u_rows_own, inv_rows_own;  // only when z_rows is not a slice of z_cols
  const float* u_rows = nullptr;
  const float* inv_rows = nullptr;
};

void normalise_into(const KernelTable& k, const at::Tensor& z, float* u, float* inv) {
  const at::Tensor zz = rows_unit_stride(z);
  const int64_t R = zz.size(0), d = zz.size(1);
  const Dt dt = to_dt(zz.scalar_type());
  const int64_t sz = zz.stride(0);
  const void* zp = zz.const_data_ptr();
  at::parallel_for(0, R, std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1)), [&](int64_t r0, int64_t r1) {
    k.normalize_rows(dt, r0, r1, d, zp, sz, u, inv);
  });
}

// z_rows is z_cols[row_offset : row_offset + n] (the single-process call): then U_rows is a view of U_cols.
bool rows_alias_cols(const at::Tensor& z_rows, const at::Tensor& z_cols, int64_t row_offset) {
  if (z_rows.numel() == 0 || !z_rows.is_alias_of(z_cols)) return false;
  if (z_rows.strides() != z_cols.strides() && !(z_rows.size(0) == 1 && z_rows.stride(1) == z_cols.stride(1)))
    return false;
  const auto* base = static_cast<const char*>(z_cols.const_data_ptr());
  return static_cast<const char*>(z_rows.const_data_ptr()) ==
         base + row_offset * z_cols.stride(0) * static_cast<int64_t>(z_cols.element_size());
}

Normalised normalise(const KernelTable& k, const at::Tensor& z_rows, const at::Tensor& z_cols,
                     const Problem& p) {
  Normalised out;
  auto f32 = z_cols.options().dtype(at::kFloat);
  out.u_cols = at::empty({p.N, p.d}, f32);
  out.inv_cols = at::empty({p.N}, f32);
  normalise_into(k, z_cols, out.u_cols.data_ptr<float>(), out.inv_cols.data_ptr<float>());
  if (rows_alias_cols(z_rows, z_cols, p.row_offset)) {
    out.u_rows = out.u_cols.const_data_ptr<float>() + p.row_offset * p.d;
    out.inv_rows = out.inv_cols.const_data_ptr<float>() + p.row_offset;
  } else {
    out.u_rows_own = at::empty({p.n, p.d}, f32);
    out.inv_rows_own = at::empty({p.n}, f32);
    normalise_into(k, z_rows, out.u_rows_own.data_ptr<float>(), out.inv_rows_own.data_ptr<float>());
    out.u_rows = out.u_rows_own.const_data_ptr<float>();
    out.inv_rows = out.inv_rows_own.const_data_ptr<float>();
  }
  return out;
}

// Columns of global row gi that are outside its denominator set, in [k0, k0 + ck): calls f(k - k0).
template <typename F>
inline void for_excluded(const Problem& p, int64_t gi, int64_t k0, int64_t ck, F f) {
  if (p.denominator == 0) {
    if (gi >= k0 && gi < k0 + ck) f(gi - k0);
    return;
  }
  const int64_t b = gi % p.B;
  // the V rows of image b: b, b + B, ..., inside the tile
  int64_t first = b;
  if (first < k0) first += ((k0 - b + p.B - 1) / p.B) * p.B;
  for (int64_t kk = first; kk < k0 + ck; kk += p.B) f(kk - k0);
}

// true: the split backward (see nt_xent_bwd_cpu). URKLE_FAST_NT_XENT_CPU_BWD=private|split forces one
// (tests); by default the per-thread buffers are used while they total at most 64 MiB.
bool pick_bwd_strategy(int64_t threads, int64_t N, int64_t d) {
  if (const char* env = std::getenv("URKLE_FAST_NT_XENT_CPU_BWD")) {
    const std::string v(env);
    if (v == "split") return true;
    if (v == "private") return false;
    TORCH_CHECK(v.empty() || v == "auto", "URKLE_FAST_NT_XENT_CPU_BWD: expected auto, private or split, got '", v,
                "'");
  }
  return threads > 1 && threads * N * d * static_cast<int64_t>(sizeof(float)) > (int64_t(64) << 20);
}

int64_t row_blocks(int64_t n) {
  return (n + kRowBlock - 1) / kRowBlock;
}

// ---------------------------------------------------------------------------------------------- forward

std::tuple<at::Tensor, at::Tensor> nt_xent_fwd_cpu(const at::Tensor& z_rows, const at::Tensor& z_cols,
                                                   int64_t views, double temperature, int64_t denominator,
                                                   int64_t row_offset) {
  const Problem p = check_problem(kFwd, z_rows, z_cols, views, temperature, denominator, row_offset);
  const KernelTable& k = kernels();
  auto f32 = z_rows.options().dtype(at::kFloat);
  at::Tensor loss_rows = at::empty({p.n}, f32);
  at::Tensor lse = at::empty({p.n}, f32);
  if (p.n == 0) return {loss_rows, lse};
  const Normalised u = normalise(k, z_rows, z_cols, p);
  const float* uc = u.u_cols.const_data_ptr<float>();
  const float* ur = u.u_rows;
  float* loss_p = loss_rows.data_ptr<float>();
  float* lse_p = lse.data_ptr<float>();
  const int64_t d = p.d, N = p.N;

  at::parallel_for(0, row_blocks(p.n), 1, [&](int64_t blk0, int64_t blk1) {
    // through ATen's allocator (not std::vector) so that memory profilers see every byte this op uses
    at::Tensor tile_t = at::empty({kRowBlock * std::min(kColTile, N)}, f32);
    float* tile = tile_t.data_ptr<float>();
    std::vector<float> m(kRowBlock), l(kRowBlock);
    for (int64_t blk = blk0; blk < blk1; ++blk) {
      const int64_t i0 = blk * kRowBlock, rb = std::min(kRowBlock, p.n - i0);
      std::fill(m.begin(), m.end(), kNegInf);
      std::fill(l.begin(), l.end(), 0.f);
      for (int64_t k0 = 0; k0 < N; k0 += kColTile) {
        const int64_t ck = std::min(kColTile, N - k0);
        float* S = tile;
        gemm(false, true, rb, ck, d, p.inv_tau, ur + i0 * d, d, uc + k0 * d, d, 0.f, S, ck);
        for (int64_t r = 0; r < rb; ++r) {
          float* row = S + r * ck;
          for_excluded(p, p.row_offset + i0 + r, k0, ck, [&](int64_t j) { row[j] = kNegInf; });
          k.lse_update(row, ck, &m[r], &l[r]);
        }
      }
      for (int64_t r = 0; r < rb; ++r) {
        const int64_t i = i0 + r, gi = p.row_offset + i;
        const float lse_i = m[r] == kNegInf ? kNegInf : m[r] + std::log(l[r]);
        float pos = 0.f;
        for (int64_t v = 0; v < p.V; ++v) {
          const int64_t kk = gi % p.B + v * p.B;
          if (kk != gi) pos += k.dot(ur + i * d, uc + kk * d, d);
        }
        lse_p[i] = lse_i;
        loss_p[i] = static_cast<float>(p.V - 1) * lse_i - pos * p.inv_tau;
      }
    }
  });
  return {loss_rows, lse};
}

// --------------------------------------------------------------------------------------------- backward

std::tuple<at::Tensor, at::Tensor> nt_xent_bwd_cpu(const at::Tensor& grad_rows, const at::Tensor& z_rows,
                                                   const at::Tensor& z_cols, const at::Tensor& lse,
                                                   int64_t views, double temperature, int64_t denominator,
                                                   int64_t row_offset, bool cols_grad) {
  const Problem p = check_problem(kBwd, z_rows, z_cols, views, temperature, denominator, row_offset);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"grad_rows", grad_rows},
                                std::pair<const char*, const at::Tensor&>{"lse", lse}}) {
    check_dim(kBwd, name, t, 1, "[n]");
    TORCH_CHECK(t.size(0) == p.n, kBwd, ": ", name, " must have shape [n] = [", p.n, "], got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == at::kFloat, kBwd, ": ", name, " must be float32, got ", t.scalar_type());
    check_device(kBwd, name, t, c10::DeviceType::CPU);
  }
  const KernelTable& k = kernels();
  at::Tensor dz_rows = at::empty(z_rows.sizes(), z_rows.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor dz_cols = at::empty(z_cols.sizes(), z_cols.options().memory_format(at::MemoryFormat::Contiguous));
  if (p.n == 0 || !cols_grad) dz_cols.zero_();  // no rows, or the columns are detached: nothing flows to them
  if (p.n == 0) return {dz_rows, dz_cols};
  const Normalised u = normalise(k, z_rows, z_cols, p);
  const float* uc = u.u_cols.const_data_ptr<float>();
  const float* ur = u.u_rows;
  const at::Tensor c_t = grad_rows.contiguous(), lse_t = lse.contiguous();
  const float* c = c_t.const_data_ptr<float>();
  const float* lse_p = lse_t.const_data_ptr<float>();
  const int64_t d = p.d, N = p.N;
  const float vm1 = static_cast<float>(p.V - 1);

  auto f32 = z_rows.options().dtype(at::kFloat);
  // dU_cols[tile] collects G^T U_rows over every row block, so the threads that own row blocks cannot
  // write it directly. Two strategies (pick_bwd_strategy):
  //   private: each thread adds G^T U_rows into its own [N, d] buffer (3 GEMMs per tile, T N d extra
  //            floats), the buffers are summed at the end;
  //   split:   a second, column-parallel pass recomputes the transposed tiles and owns dU_cols[block]
  //            (4 GEMMs per tile, nothing per thread, the same bits whatever the thread count).
  // Without cols_grad only pass 1's dU_rows is computed: pass 1 as under split (no private buffers), no pass 2.
  const int64_t T = at::get_num_threads();
  const bool split = !cols_grad || pick_bwd_strategy(T, N, d);
  at::Tensor du_rows = at::zeros({p.n, d}, f32);
  at::Tensor du_cols_buf = at::zeros({cols_grad ? (split ? 1 : T) : 0, N, d}, f32);
  float* dur = du_rows.data_ptr<float>();
  float* duc_all = du_cols_buf.data_ptr<float>();

  // pass 1, row blocks: dU_rows (and the private dU_cols)
  at::parallel_for(0, row_blocks(p.n), 1, [&](int64_t blk0, int64_t blk1) {
    const int64_t tid = split ? 0 : at::get_thread_num();
    TORCH_CHECK(tid < T, kBwd, ": internal error, thread id ", tid, " >= ", T);
    float* duc = duc_all + tid * N * d;
    // through ATen's allocator (not std::vector) so that memory profilers see every byte this op uses
    at::Tensor tile_t = at::empty({kRowBlock * std::min(kColTile, N)}, f32);
    float* S = tile_t.data_ptr<float>();
    for (int64_t blk = blk0; blk < blk1; ++blk) {
      const int64_t i0 = blk * kRowBlock, rb = std::min(kRowBlock, p.n - i0);
      for (int64_t k0 = 0; k0 < N; k0 += kColTile) {
        const int64_t ck = std::min(kColTile, N - k0);
        gemm(false, true, rb, ck, d, p.inv_tau, ur + i0 * d, d, uc + k0 * d, d, 0.f, S, ck);
        for (int64_t r = 0; r < rb; ++r) {
          const int64_t i = i0 + r;
          float* row = S + r * ck;
          const float coef = c[i] * vm1 * p.inv_tau;
          if (coef == 0.f || !(lse_p[i] > kNegInf)) {  // nothing flows through this row
            std::fill(row, row + ck, 0.f);
            continue;
          }
          k.scaled_softmax(row, ck, lse_p[i], coef);
          for_excluded(p, p.row_offset + i, k0, ck, [&](int64_t j) { row[j] = 0.f; });
        }
        // dU_rows[block] += G U_cols[tile];  dU_cols[tile] += G^T U_rows[block]   (1/tau is inside G)
        gemm(false, false, rb, d, ck, 1.f, S, ck, uc + k0 * d, d, 1.f, dur + i0 * d, d);
        if (!split) gemm(true, false, ck, d, rb, 1.f, S, ck, ur + i0 * d, d, 1.f, duc + k0 * d, d);
      }
      // the positives: G_ip = -c_i / tau for the V-1 rows p of the same image
      for (int64_t r = 0; r < rb; ++r) {
        const int64_t i = i0 + r, gi = p.row_offset + i;
        const float w = -c[i] * p.inv_tau;
        if (w == 0.f) continue;
        for (int64_t v = 0; v < p.V; ++v) {
          const int64_t kk = gi % p.B + v * p.B;
          if (kk == gi) continue;
          k.axpy(w, uc + kk * d, dur + i * d, d);
          if (!split) k.axpy(w, ur + i * d, duc + kk * d, d);
        }
      }
    }
  });

  if (cols_grad && !split) {  // dU_cols = sum of the per-thread buffers, into buffer 0
    at::parallel_for(0, N, std::max<int64_t>(1, 8192 / std::max<int64_t>(d, 1)), [&](int64_t r0, int64_t r1) {
      k.sum_rows(duc_all + r0 * d, T, N * d, duc_all + r0 * d, (r1 - r0) * d);
    });
  } else if (cols_grad) {  // pass 2, column blocks: dU_cols[block] = sum over row tiles of G^T U_rows
    // G's row factors as vectors along the transposed tiles; a row with nothing to give gets coef 0 and
    // lse +inf, so that its entries are exp(-inf) * 0 = 0 rather than NaN
    at::Tensor colf_t = at::empty({2, p.n}, f32);
    float* coefs = colf_t.data_ptr<float>();
    float* lses = coefs + p.n;
    for (int64_t i = 0; i < p.n; ++i) {
      const float coef = c[i] * vm1 * p.inv_tau;
      const bool live = coef != 0.f && lse_p[i] > kNegInf;
      coefs[i] = live ? coef : 0.f;
      lses[i] = live ? lse_p[i] : std::numeric_limits<float>::infinity();
    }
    at::parallel_for(0, row_blocks(N), 1, [&](int64_t blk0, int64_t blk1) {
      at::Tensor tile_t = at::empty({kRowBlock * std::min(kColTile, p.n)}, f32);
      float* St = tile_t.data_ptr<float>();
      for (int64_t blk = blk0; blk < blk1; ++blk) {
        const int64_t k0 = blk * kRowBlock, kc = std::min(kRowBlock, N - k0);
        for (int64_t i0 = 0; i0 < p.n; i0 += kColTile) {
          const int64_t ri = std::min(kColTile, p.n - i0);
          gemm(false, true, kc, ri, d, p.inv_tau, uc + k0 * d, d, ur + i0 * d, d, 0.f, St, ri);
          for (int64_t r = 0; r < kc; ++r) {
            float* row = St + r * ri;
            k.scaled_softmax_cols(row, ri, lses + i0, coefs + i0);
            // the exclusion relation is symmetric: rows gi outside Den are those with k outside Den(gi)
            for_excluded(p, k0 + r, p.row_offset + i0, ri, [&](int64_t j) { row[j] = 0.f; });
          }
          gemm(false, false, kc, d, ri, 1.f, St, ri, ur + i0 * d, d, 1.f, duc_all + k0 * d, d);
        }
        // the positives of column kk: the rows gi != kk of its image that this call owns
        for (int64_t kk = k0; kk < k0 + kc; ++kk) {
          for (int64_t v = 0; v < p.V; ++v) {
            const int64_t gi = kk % p.B + v * p.B, i = gi - p.row_offset;
            if (gi == kk || i < 0 || i >= p.n || c[i] == 0.f) continue;
            k.axpy(-c[i] * p.inv_tau, ur + i * d, duc_all + kk * d, d);
          }
        }
      }
    });
  }
  const float* duc = duc_all;
  const Dt dt = to_dt(z_rows.scalar_type());
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1));
  at::parallel_for(0, p.n, grain, [&](int64_t r0, int64_t r1) {
    k.normalize_bwd_rows(dt, r0, r1, d, dur, ur, u.inv_rows, dz_rows.data_ptr());
  });
  if (cols_grad) {
    at::parallel_for(0, N, grain, [&](int64_t r0, int64_t r1) {
      k.normalize_bwd_rows(dt, r0, r1, d, duc, uc, u.inv_cols.const_data_ptr<float>(), dz_cols.data_ptr());
    });
  }
  return {dz_rows, dz_cols};
}

}  // namespace
}  // namespace urkle_fast::cpu

TORCH_LIBRARY_IMPL(urkle_fast, CPU, m) {
  m.impl("nt_xent_fwd_native", &urkle_fast::cpu::nt_xent_fwd_cpu);
  m.impl("nt_xent_bwd_native", &urkle_fast::cpu::nt_xent_bwd_cpu);
}
