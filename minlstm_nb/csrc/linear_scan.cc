
// h_t = a_t * h_{t-1} + b_t along axis 1 of (batch, time, features). reverse=true runs the backward recurrence
// g_t = a_{t+1} * g_{t+1} + b_t from the end (a read one step ahead, g_{T-1} = b_{T-1}; h0 is then unused).
// Work is split over (batch row, block of 16 features); each block sweeps the time axis once, vectorised.
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/util/work_sharder.h"
using namespace tensorflow;

REGISTER_OP("MinlstmLinearScan")
    .Attr("T: {float, double}").Attr("reverse: bool = false")
    .Input("a: T").Input("b: T").Input("h0: T").Output("h: T")
    .SetShapeFn([](shape_inference::InferenceContext* c) { c->set_output(0, c->input(1)); return absl::OkStatus(); });

template <typename T>
class LinearScanOp : public OpKernel {
 public:
  explicit LinearScanOp(OpKernelConstruction* ctx) : OpKernel(ctx) { OP_REQUIRES_OK(ctx, ctx->GetAttr("reverse", &reverse_)); }
  void Compute(OpKernelContext* ctx) override {
    const Tensor &a = ctx->input(0), &b = ctx->input(1), &h0 = ctx->input(2);
    OP_REQUIRES(ctx, b.dims() == 3 && a.shape() == b.shape(), absl::InvalidArgumentError("a and b must be 3-D and of one shape"));
    const int64_t B = b.dim_size(0), L = b.dim_size(1), D = b.dim_size(2), W = 16, nblk = (D + W - 1) / W;
    OP_REQUIRES(ctx, h0.dims() == 2 && h0.dim_size(0) == B && h0.dim_size(1) == D, absl::InvalidArgumentError("h0 must be (batch, features)"));
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, b.shape(), &out));
    if (L == 0 || D == 0 || B == 0) return;
    const T *pa = a.flat<T>().data(), *pb = b.flat<T>().data(), *ph0 = h0.flat<T>().data();
    T* ph = out->flat<T>().data();
    const bool rev = reverse_;
    auto work = [&](int64_t start, int64_t end) {
      for (int64_t u = start; u < end; ++u) {
        const int64_t r = u / nblk, d0 = (u % nblk) * W, w = std::min(W, D - d0);
        const int64_t base = r * L * D + d0;
        T h[16];
        for (int64_t d = 0; d < w; ++d) h[d] = ph0[r * D + d0 + d];
        if (!rev) {
          for (int64_t t = 0; t < L; ++t) {
            const T *at = pa + base + t * D, *bt = pb + base + t * D;
            T* ht = ph + base + t * D;
            for (int64_t d = 0; d < w; ++d) { h[d] = at[d] * h[d] + bt[d]; ht[d] = h[d]; }
          }
        } else {
          for (int64_t t = L - 1; t >= 0; --t) {
            const T* bt = pb + base + t * D;
            T* ht = ph + base + t * D;
            if (t == L - 1) { for (int64_t d = 0; d < w; ++d) { h[d] = bt[d]; ht[d] = h[d]; } }
            else {
              const T* an = pa + base + (t + 1) * D;
              for (int64_t d = 0; d < w; ++d) { h[d] = an[d] * h[d] + bt[d]; ht[d] = h[d]; }
            }
          }
        }
      }
    };
    auto* pool = ctx->device()->tensorflow_cpu_worker_threads();
    Shard(pool->num_threads, pool->workers, B * nblk, L * W * 8, work);
  }
 private:
  bool reverse_;
};
REGISTER_KERNEL_BUILDER(Name("MinlstmLinearScan").Device(DEVICE_CPU).TypeConstraint<float>("T"), LinearScanOp<float>);
REGISTER_KERNEL_BUILDER(Name("MinlstmLinearScan").Device(DEVICE_CPU).TypeConstraint<double>("T"), LinearScanOp<double>);
