
// minGRU / minLSTM gates and scan fused (parallel mode), forward and backward, one sweep over time each.
// ks: N = 2 ([k_z, k_h], minGRU) or N = 3 ([k_f, k_i, k_h], minLSTM) projections without their biases,
// (batch, time, units); biases: the N biases, (units,), added here rather than in a pass of their own.
// mask: (batch, time) of 1/0, or an empty tensor for none. A masked step keeps the state (a = 1, b = 0).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <type_traits>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/util/work_sharder.h"
using namespace tensorflow;

REGISTER_OP("MinlstmGateScan")
    .Attr("T: {float, double}").Attr("N: int >= 2")
    .Input("ks: N * T").Input("biases: N * T").Input("h0: T").Input("mask: T").Output("h: T")
    .SetShapeFn([](shape_inference::InferenceContext* c) { c->set_output(0, c->input(0)); return absl::OkStatus(); });
REGISTER_OP("MinlstmGateScanGrad")
    .Attr("T: {float, double}").Attr("N: int >= 2")
    .Input("ks: N * T").Input("biases: N * T").Input("h0: T").Input("mask: T").Input("h: T").Input("dh: T")
    .Output("dks: N * T").Output("dbiases: N * T").Output("dh0: T")
    .SetShapeFn([](shape_inference::InferenceContext* c) {
      int n; TF_RETURN_IF_ERROR(c->GetAttr("N", &n));
      for (int i = 0; i < 2 * n; ++i) c->set_output(i, c->input(i));
      c->set_output(2 * n, c->input(2 * n)); return absl::OkStatus(); });

// e^x for x <= 0, inlined so that the compiler vectorises the loops that call it (a call to the maths library per
// vector costs more than the arithmetic). float: x = n ln2 + r with |r| <= ln2/2, e^r by its Taylor series to r^7
// (remainder below 6e-9, under float's 6e-8 rounding step), times 2^n built in the exponent bits; below -87.3 the
// result would be subnormal, and 0 is returned. double: the maths library.
inline float nexp(float x) {
  const float n = std::floor(x * 1.44269504f + 0.5f);
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;       // ln2 in two parts: n * 0.693359375f is exact
  float p = 1.f / 5040.f;
  p = p * r + 1.f / 720.f; p = p * r + 1.f / 120.f; p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f; p = p * r + 0.5f; p = p * r + 1.f; p = p * r + 1.f;
  const int32_t bits = (static_cast<int32_t>(std::max(n, -126.f)) + 127) << 23;
  float s; std::memcpy(&s, &bits, sizeof s);
  return x < -87.3f ? 0.f : p * s;
}
inline double nexp(double x) { return std::exp(x); }

// The gates of one step from the pre-activations, each exponential of a non-positive number (nothing overflows).
// a = normalised forget gate (or 1 - z), ip = normalised input gate (or z), gh = g(k_h), gp = g'(k_h);
// sf = sigmoid(-k_f), si = sigmoid(-k_i) (minLSTM; the gradient needs them).
// minLSTM: with t_f = e^-|k_f|, sigmoid(k_f) = n_f / (1 + t_f), n_f = e^min(k_f, 0), and likewise for k_i, so
// f' = f / (f + i) = P / (P + Q), P = (1 + t_i) n_f, Q = (1 + t_f) n_i; dividing P and Q by the larger of n_f, n_i
// leaves e^-|q|, q = min(k_i, 0) - min(k_f, 0), in place of the smaller: right even when both gates are below e^-80.
template <typename T, bool LSTM>
inline void gates(T k0, T k1, T kh, T& a, T& ip, T& gh, T& gp, T& sf, T& si) {
  if (LSTM) {
    const T tf = nexp(-std::abs(k0)), ti = nexp(-std::abs(k1));
    const T q = std::min(k1, T(0)) - std::min(k0, T(0)), eq = nexp(-std::abs(q));
    const T P = (T(1) + ti) * (q >= T(0) ? eq : T(1)), Q = (T(1) + tf) * (q >= T(0) ? T(1) : eq);
    const T rden = T(1) / (P + Q);
    a = P * rden; ip = Q * rden;
    const T rf = T(1) / (T(1) + tf), ri = T(1) / (T(1) + ti);          // only the gradient uses these
    sf = k0 >= T(0) ? tf * rf : rf; si = k1 >= T(0) ? ti * ri : ri;
  } else {
    const T t = nexp(-std::abs(k0)), r = T(1) / (T(1) + t);
    ip = k0 >= T(0) ? r : t * r; a = k0 >= T(0) ? t * r : r; sf = si = T(0);
  }
  const T th = nexp(-std::abs(kh)), rh = T(1) / (T(1) + th);
  const T sp = kh >= T(0) ? rh : th * rh;                                  // sigmoid(k_h)
  gh = kh >= T(0) ? kh + T(0.5) : sp;
  gp = kh >= T(0) ? T(1) : sp * (T(1) - sp);
}

template <typename T>
static Status check(const OpInputList& ks, const Tensor& h0, const Tensor& m) {
  if (ks.size() != 2 && ks.size() != 3) return absl::InvalidArgumentError("ks must hold 2 (minGRU) or 3 (minLSTM) tensors");
  for (int i = 0; i < ks.size(); ++i)
    if (ks[i].dims() != 3 || ks[i].shape() != ks[0].shape()) return absl::InvalidArgumentError("pre-activations must be 3-D and of one shape");
  if (h0.dims() != 2 || h0.dim_size(0) != ks[0].dim_size(0) || h0.dim_size(1) != ks[0].dim_size(2))
    return absl::InvalidArgumentError("h0 must be (batch, units)");
  if (m.NumElements() > 0 && (m.dims() != 2 || m.dim_size(0) != ks[0].dim_size(0) || m.dim_size(1) != ks[0].dim_size(1)))
    return absl::InvalidArgumentError("mask must be (batch, time) or empty");
  return absl::OkStatus();
}

// The work: B rows of the batch times blocks of features; each block is swept through time with its state in
// registers. Blocks are 64 features wide (four AVX-512 vectors, whose exponentials overlap) when there are enough of
// them to keep every thread busy, else 16; the width is a compile-time constant so the inner loop has no remainder.
// The backward sweep writes its three outputs with non-temporal stores where it can (float, AVX-512, aligned): they
// go straight to memory instead of first reading each line into the cache, about a quarter of its memory traffic.
template <typename T>
struct Sweep {
  const T *k0, *k1, *kh, *b0, *b1, *bh, *h0, *mask, *h, *dh;   // inputs (h, dh: backward only)
  T *out0, *out1, *outh, *dh0;       // forward: outh = h; backward: dk0, dk1, dkh and dh0
  double* db;                        // backward: per row of the batch, the bias gradients (B, 3, D)
  int64_t B, L, D;
  bool stream;                       // outputs written with non-temporal stores (float, AVX-512, aligned)

  template <int W>
  inline void store(T* dst, const T* src) const {
#if defined(__AVX512F__)
    if (std::is_same<T, float>::value && W % 16 == 0 && stream) {
      for (int v = 0; v < W; v += 16) _mm512_stream_ps(reinterpret_cast<float*>(dst) + v, _mm512_loadu_ps(reinterpret_cast<const float*>(src) + v));
      return;
    }
#endif
    for (int d = 0; d < W; ++d) dst[d] = src[d];
  }

  template <bool LSTM, int W>
  void forward(int64_t r, int64_t d0) const {
    T s[W], c0[W], c1[W], ch[W];
    for (int d = 0; d < W; ++d) { s[d] = h0[r * D + d0 + d]; c0[d] = b0[d0 + d]; c1[d] = b1[d0 + d]; ch[d] = bh[d0 + d]; }
    for (int64_t t = 0; t < L; ++t) {
      const int64_t off = (r * L + t) * D + d0;
      if (mask && mask[r * L + t] == T(0)) { for (int d = 0; d < W; ++d) outh[off + d] = s[d]; continue; }
#pragma GCC ivdep
      for (int d = 0; d < W; ++d) {
        T a, ip, gh, gp, sf, si; gates<T, LSTM>(k0[off + d] + c0[d], k1[off + d] + c1[d], kh[off + d] + ch[d], a, ip, gh, gp, sf, si);
        s[d] = a * s[d] + ip * gh;
      }
      for (int d = 0; d < W; ++d) outh[off + d] = s[d];
    }
  }

  template <bool LSTM, int W>
  void backward(int64_t r, int64_t d0) const {
    T g[W], an[W], c0[W], c1[W], ch[W], o0[W], o1[W], oh[W];   // g: dL/dh_{t+1} through every path; an: a_{t+1}
    T s0[W], s1[W], sh[W]; double S0[W], S1[W], Sh[W];          // bias gradients: float within 64 steps, then double
    for (int d = 0; d < W; ++d) {
      g[d] = an[d] = s0[d] = s1[d] = sh[d] = T(0); S0[d] = S1[d] = Sh[d] = 0.;
      c0[d] = b0[d0 + d]; c1[d] = b1[d0 + d]; ch[d] = bh[d0 + d];
    }
    for (int64_t t = L - 1; t >= 0; --t) {
      const int64_t off = (r * L + t) * D + d0;
      const T* hp = t > 0 ? h + off - D : h0 + r * D + d0;
      if (mask && mask[r * L + t] == T(0)) {
        for (int d = 0; d < W; ++d) { g[d] = dh[off + d] + an[d] * g[d]; an[d] = T(1); o0[d] = o1[d] = oh[d] = T(0); }
      } else {
#pragma GCC ivdep
        for (int d = 0; d < W; ++d) {
          T a, ip, gh, gp, sf, si; gates<T, LSTM>(k0[off + d] + c0[d], k1[off + d] + c1[d], kh[off + d] + ch[d], a, ip, gh, gp, sf, si);
          const T gt = dh[off + d] + an[d] * g[d];
          const T dd = a * ip * gt * (gh - hp[d]);
          o0[d] = LSTM ? -dd * sf : dd; o1[d] = dd * si; oh[d] = gt * ip * gp;
          s0[d] += o0[d]; s1[d] += o1[d]; sh[d] += oh[d];
          g[d] = gt; an[d] = a;
        }
      }
      store<W>(out0 + off, o0); store<W>(outh + off, oh); if (LSTM) store<W>(out1 + off, o1);
      if ((t & 63) == 0)
        for (int d = 0; d < W; ++d) { S0[d] += s0[d]; S1[d] += s1[d]; Sh[d] += sh[d]; s0[d] = s1[d] = sh[d] = T(0); }
    }
    for (int d = 0; d < W; ++d) {
      dh0[r * D + d0 + d] = an[d] * g[d];
      db[(r * 3 + 0) * D + d0 + d] = S0[d]; db[(r * 3 + 1) * D + d0 + d] = S1[d]; db[(r * 3 + 2) * D + d0 + d] = Sh[d];
    }
  }

  // Run the forward or the backward sweep over every (row, block), sharded over TensorFlow's CPU threads.
  template <bool BWD>
  void run(OpKernelContext* ctx, bool lstm) const {
    auto* pool = ctx->device()->tensorflow_cpu_worker_threads();
    const int64_t wide = (D / 64) * B >= 2 * pool->num_threads ? 64 : 16;
    const int64_t full = D / wide, nblk = full + (D % wide ? (D % wide + 15) / 16 : 0);
    auto work = [&, this](int64_t start, int64_t end) {
      for (int64_t u = start; u < end; ++u) {
        const int64_t r = u / nblk, b = u % nblk;
        if (b < full) {
          const int64_t d0 = b * wide;
          if (wide == 64) dispatch<BWD, 64>(lstm, r, d0); else dispatch<BWD, 16>(lstm, r, d0);
        } else {                                   // the last D % wide features: blocks of 16, then the remainder
          const int64_t d0 = full * wide + (b - full) * 16;
          if (D - d0 >= 16) dispatch<BWD, 16>(lstm, r, d0);
          else switch (D - d0) {
#define C(w) case w: dispatch<BWD, w>(lstm, r, d0); break;
            C(1) C(2) C(3) C(4) C(5) C(6) C(7) C(8) C(9) C(10) C(11) C(12) C(13) C(14) C(15)
#undef C
          }
        }
      }
#if defined(__AVX512F__)
      if (stream) _mm_sfence();
#endif
    };
    Shard(pool->num_threads, pool->workers, B * nblk, L * wide * (BWD ? 40 : 25), work);
  }
  template <bool BWD, int W>
  void dispatch(bool lstm, int64_t r, int64_t d0) const {
    if (BWD) { if (lstm) backward<true, W>(r, d0); else backward<false, W>(r, d0); }
    else { if (lstm) forward<true, W>(r, d0); else forward<false, W>(r, d0); }
  }
};

// Reads and checks the inputs both ops share (ks, biases, h0, mask) into the sweep.
template <typename T>
static Status read_inputs(OpKernelContext* ctx, OpInputList& ks, OpInputList& bs, Sweep<T>& s) {
  TF_RETURN_IF_ERROR(ctx->input_list("ks", &ks)); TF_RETURN_IF_ERROR(ctx->input_list("biases", &bs));
  const int n = ks.size();
  const Tensor &h0 = ctx->input(2 * n), &m = ctx->input(2 * n + 1);
  TF_RETURN_IF_ERROR(check<T>(ks, h0, m));
  for (int i = 0; i < bs.size(); ++i)
    if (bs[i].dims() != 1 || bs[i].dim_size(0) != ks[0].dim_size(2)) return absl::InvalidArgumentError("biases must be (units,)");
  s.k0 = ks[0].flat<T>().data(); s.k1 = ks[1].flat<T>().data(); s.kh = ks[n - 1].flat<T>().data();
  s.b0 = bs[0].flat<T>().data(); s.b1 = bs[1].flat<T>().data(); s.bh = bs[n - 1].flat<T>().data();
  s.h0 = h0.flat<T>().data(); s.mask = m.NumElements() > 0 ? m.flat<T>().data() : nullptr;
  s.B = ks[0].dim_size(0); s.L = ks[0].dim_size(1); s.D = ks[0].dim_size(2);
  return absl::OkStatus();
}

template <typename T>
class GateScanOp : public OpKernel {
 public:
  explicit GateScanOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}
  void Compute(OpKernelContext* ctx) override {
    OpInputList ks, bs; Sweep<T> s{};
    OP_REQUIRES_OK(ctx, read_inputs<T>(ctx, ks, bs, s));
    Tensor* out = nullptr; OP_REQUIRES_OK(ctx, ctx->allocate_output(0, ks[0].shape(), &out));
    s.outh = out->flat<T>().data();
    if (s.B * s.L * s.D > 0) s.template run<false>(ctx, ks.size() == 3);
  }
};

template <typename T>
class GateScanGradOp : public OpKernel {
 public:
  explicit GateScanGradOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}
  void Compute(OpKernelContext* ctx) override {
    OpInputList ks, bs; Sweep<T> s{};
    OP_REQUIRES_OK(ctx, read_inputs<T>(ctx, ks, bs, s));
    const int n = ks.size();
    const Tensor &h0 = ctx->input(2 * n), &hs = ctx->input(2 * n + 2), &dh = ctx->input(2 * n + 3);
    OP_REQUIRES(ctx, hs.shape() == ks[0].shape() && dh.shape() == ks[0].shape(), absl::InvalidArgumentError("h and dh must be shaped like ks"));
    OpOutputList dks, dbs; OP_REQUIRES_OK(ctx, ctx->output_list("dks", &dks)); OP_REQUIRES_OK(ctx, ctx->output_list("dbiases", &dbs));
    T *pd[3] = {nullptr, nullptr, nullptr}, *pb[3] = {nullptr, nullptr, nullptr};
    for (int i = 0; i < n; ++i) {
      Tensor* t = nullptr; OP_REQUIRES_OK(ctx, dks.allocate(i, ks[0].shape(), &t)); pd[i] = t->flat<T>().data();
      OP_REQUIRES_OK(ctx, dbs.allocate(i, bs[i].shape(), &t)); pb[i] = t->flat<T>().data();
    }
    Tensor* dh0t = nullptr; OP_REQUIRES_OK(ctx, ctx->allocate_output(2 * n, h0.shape(), &dh0t));
    std::vector<double> db(s.B * 3 * s.D, 0.);
    s.h = hs.flat<T>().data(); s.dh = dh.flat<T>().data();
    s.out0 = pd[0]; s.out1 = pd[1]; s.outh = pd[n - 1]; s.dh0 = dh0t->flat<T>().data(); s.db = db.data();
    s.stream = std::is_same<T, float>::value && s.D % 16 == 0 &&
               ((reinterpret_cast<uintptr_t>(pd[0]) | reinterpret_cast<uintptr_t>(pd[1]) | reinterpret_cast<uintptr_t>(pd[n - 1])) & 63) == 0;
    if (s.B * s.L * s.D == 0) for (int64_t i = 0; i < h0.NumElements(); ++i) s.dh0[i] = T(0);
    else s.template run<true>(ctx, n == 3);
    for (int i = 0; i < n; ++i) {                    // sum the rows' bias gradients in a fixed order
      const int src = i == n - 1 ? 2 : i;
      for (int64_t d = 0; d < s.D; ++d) { double acc = 0.; for (int64_t r = 0; r < s.B; ++r) acc += db[(r * 3 + src) * s.D + d]; pb[i][d] = T(acc); }
    }
  }
};

#define REG(T) \
  REGISTER_KERNEL_BUILDER(Name("MinlstmGateScan").Device(DEVICE_CPU).TypeConstraint<T>("T"), GateScanOp<T>); \
  REGISTER_KERNEL_BUILDER(Name("MinlstmGateScanGrad").Device(DEVICE_CPU).TypeConstraint<T>("T"), GateScanGradOp<T>);
REG(float)
REG(double)
