// The row normalizations' CUDA kernels (layer, RMS, group and instance norm; launched by
// backends/cuda/row_norm.py), instantiated per storage type T.
//
// A row is one sample's group: K channels by S elements, element (k, s) of row (n, g) at
// n * sN + g * sG + k * sK + s * sS, so channels-first rows (sK = S, sS = 1) and channels-last
// samples (sK = 1, sS = C) are one kernel. A block does one row at a time (blocks loop over rows),
// or for short rows a warp does: statistics by per-thread Welford merged in a fixed order, in
// double, then the element pass. Parameters are per (group, channel), G * K entries. The gradients of the parameters
// are summed by a kernel of their own, a thread per parameter, over the samples in order.

#include "common.cuh"

namespace abn {

// Where the elements of one row lie.
struct RowStrides {
    index_t sample, group, channel, inner;
    __device__ __forceinline__ index_t at(index_t n, index_t g, index_t k, index_t s) const {
        return n * sample + g * group + k * channel + s * inner;
    }
};

#define ROW_STRIDE_PARAMS(name) index_t name##_n, index_t name##_g, index_t name##_k, index_t name##_s
#define ROW_STRIDES(name) \
    RowStrides { name##_n, name##_g, name##_k, name##_s }

// One row's work, shared by the block and the warp kernels: a thread takes elements first, first +
// step, ... of the row (its index in the block and the block size, or its lane and 32).
struct Row {
    index_t n, g, channels, inner, count, first, step;
};

template <typename T>
__device__ __forceinline__ Moments row_moments(const T* __restrict__ x, const RowStrides& xs, const Row& row, int centered) {
    Moments m{0, 0, 0};
    for (index_t i = row.first; i < row.count; i += row.step) {
        const double v = to_double(x[xs.at(row.n, row.g, i / row.inner, i % row.inner)]);
        m = merge(m, centered ? Moments{1, v, 0} : Moments{1, 0, v * v});
    }
    return m;
}

template <typename T>
__device__ __forceinline__ void normalize_row(const T* __restrict__ x, const RowStrides& xs, T* __restrict__ y,
                                              const RowStrides& ys, const Row& row, double mean, double rstd,
                                              const double* __restrict__ weight, const double* __restrict__ bias) {
    using A = typename Compute<T>::type;
    const SplitMean<A> mu(mean);
    for (index_t i = row.first; i < row.count; i += row.step) {
        const index_t k = i / row.inner, s = i % row.inner, p = row.g * row.channels + k;
        const A a = static_cast<A>(rstd * weight[p]), b = static_cast<A>(bias[p]);
        y[ys.at(row.n, row.g, k, s)] = from_compute<T>(mu.centre(to_compute(x[xs.at(row.n, row.g, k, s)])) * a + b);
    }
}

// The sums of weight * dy and weight * dy * x_hat over a thread's elements of a row.
template <typename T>
__device__ __forceinline__ SumPair row_gradient_sums(const T* __restrict__ dy, const RowStrides& dys,
                                                     const T* __restrict__ x, const RowStrides& xs, const Row& row,
                                                     double mean, double rstd, const double* __restrict__ weight) {
    SumPair sums{0, 0};
    for (index_t i = row.first; i < row.count; i += row.step) {
        const index_t k = i / row.inner, s = i % row.inner;
        const double wd = weight[row.g * row.channels + k] * to_double(dy[dys.at(row.n, row.g, k, s)]);
        sums.dy += wd;
        sums.dy_xmu += wd * ((to_double(x[xs.at(row.n, row.g, k, s)]) - mean) * rstd);
    }
    return sums;
}

// dx = (weight * dy - a - x_hat * p) * rstd: with the statistics trained, a = mean(weight * dy)
// (0 without centring) and p = mean(weight * dy * x_hat); as constants, a = p = 0.
template <typename T, bool TRAINED>
__device__ __forceinline__ void row_gradient(const T* __restrict__ dy, const RowStrides& dys, const T* __restrict__ x,
                                             const RowStrides& xs, T* __restrict__ dx, const RowStrides& dxs,
                                             const Row& row, double mean, double rstd, const double* __restrict__ weight,
                                             double a, double p) {
    for (index_t i = row.first; i < row.count; i += row.step) {
        const index_t k = i / row.inner, s = i % row.inner;
        const double x_hat = TRAINED ? (to_double(x[xs.at(row.n, row.g, k, s)]) - mean) * rstd : 0.0;
        const double d = to_double(dy[dys.at(row.n, row.g, k, s)]);
        dx[dxs.at(row.n, row.g, k, s)] = from_double<T>((weight[row.g * row.channels + k] * d - a - x_hat * p) * rstd);
    }
}

// --- rows: a block per row ------------------------------------------------------------------------

template <typename T> __global__ void __launch_bounds__(MAX_BLOCK, 1)
    rn_forward(const T* __restrict__ x, ROW_STRIDE_PARAMS(xs), T* __restrict__ y, ROW_STRIDE_PARAMS(ys),
               index_t samples, index_t groups, index_t channels, index_t inner, const double* __restrict__ weight,
               const double* __restrict__ bias, double eps, int centered, double* __restrict__ mean,
               double* __restrict__ var) {
    const RowStrides xs = ROW_STRIDES(xs);
    const RowStrides ys = ROW_STRIDES(ys);
    __shared__ Moments scratch[32];
    __shared__ double row_mean;
    __shared__ double row_var;
    for (index_t r = blockIdx.x; r < samples * groups; r += gridDim.x) {
        const Row row{r / groups, r % groups, channels, inner, channels * inner, threadIdx.x, blockDim.x};
        const Moments m = block_reduce(row_moments(x, xs, row, centered), scratch, Moments{0, 0, 0});
        if (threadIdx.x == 0) {
            row_mean = centered ? m.mean : 0.0;
            row_var = m.m2 / static_cast<double>(row.count);
            mean[r] = row_mean;
            var[r] = row_var;
        }
        __syncthreads();
        normalize_row(x, xs, y, ys, row, row_mean, inverse_std(row_var, eps), weight, bias);
        __syncthreads();  // row_mean and row_var are the next row's
    }
}

template <typename T, bool TRAINED> __global__ void __launch_bounds__(MAX_BLOCK, 1)
    rn_backward(const T* __restrict__ dy, ROW_STRIDE_PARAMS(dys), const T* __restrict__ x, ROW_STRIDE_PARAMS(xs),
                T* __restrict__ dx, ROW_STRIDE_PARAMS(dxs), index_t samples, index_t groups, index_t channels,
                index_t inner, const double* __restrict__ mean, const double* __restrict__ rstd,
                const double* __restrict__ weight, int centered) {
    const RowStrides dys = ROW_STRIDES(dys);
    const RowStrides xs = ROW_STRIDES(xs);
    const RowStrides dxs = ROW_STRIDES(dxs);
    __shared__ SumPair scratch[32];
    __shared__ double row_a;
    __shared__ double row_p;
    for (index_t r = blockIdx.x; r < samples * groups; r += gridDim.x) {
        const Row row{r / groups, r % groups, channels, inner, channels * inner, threadIdx.x, blockDim.x};
        if (TRAINED) {
            const SumPair sums =
                block_reduce(row_gradient_sums(dy, dys, x, xs, row, mean[r], rstd[r], weight), scratch, SumPair{0, 0});
            if (threadIdx.x == 0) {
                row_a = centered ? sums.dy / static_cast<double>(row.count) : 0.0;
                row_p = sums.dy_xmu / static_cast<double>(row.count);
            }
            __syncthreads();
        }
        row_gradient<T, TRAINED>(dy, dys, x, xs, dx, dxs, row, mean[r], rstd[r], weight, TRAINED ? row_a : 0.0,
                                 TRAINED ? row_p : 0.0);
        if (TRAINED) __syncthreads();  // row_a and row_p are the next row's
    }
}

// --- short rows: a warp per row -------------------------------------------------------------------
// Rows of at most a few warps' worth of elements (layer norm's 768 or 1024) leave most of a block
// idle; here each warp of a block does its own rows, reducing through shuffles alone (lane 0 ends
// with the result, which it then hands to every lane), so warps never wait for one another.

template <typename R> __device__ __forceinline__ R warp_reduce(R value) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) value = combine(value, shuffle_down(value, offset));
    return value;
}

__device__ __forceinline__ double from_lane0(double v) { return __shfl_sync(FULL_MASK, v, 0); }

template <typename T> __global__ void __launch_bounds__(MAX_BLOCK, 1)
    rn_forward_warp(const T* __restrict__ x, ROW_STRIDE_PARAMS(xs), T* __restrict__ y, ROW_STRIDE_PARAMS(ys),
                    index_t samples, index_t groups, index_t channels, index_t inner,
                    const double* __restrict__ weight, const double* __restrict__ bias, double eps, int centered,
                    double* __restrict__ mean, double* __restrict__ var) {
    const RowStrides xs = ROW_STRIDES(xs);
    const RowStrides ys = ROW_STRIDES(ys);
    const int lane = threadIdx.x % 32, warps = blockDim.x / 32;
    for (index_t r = blockIdx.x * static_cast<index_t>(warps) + threadIdx.x / 32; r < samples * groups;
         r += static_cast<index_t>(gridDim.x) * warps) {
        const Row row{r / groups, r % groups, channels, inner, channels * inner, lane, 32};
        const Moments m = warp_reduce(row_moments(x, xs, row, centered));
        const double row_mean = from_lane0(centered ? m.mean : 0.0);
        const double row_var = from_lane0(m.m2 / static_cast<double>(row.count));
        if (lane == 0) {
            mean[r] = row_mean;
            var[r] = row_var;
        }
        normalize_row(x, xs, y, ys, row, row_mean, inverse_std(row_var, eps), weight, bias);
    }
}

template <typename T, bool TRAINED> __global__ void __launch_bounds__(MAX_BLOCK, 1)
    rn_backward_warp(const T* __restrict__ dy, ROW_STRIDE_PARAMS(dys), const T* __restrict__ x, ROW_STRIDE_PARAMS(xs),
                     T* __restrict__ dx, ROW_STRIDE_PARAMS(dxs), index_t samples, index_t groups, index_t channels,
                     index_t inner, const double* __restrict__ mean, const double* __restrict__ rstd,
                     const double* __restrict__ weight, int centered) {
    const RowStrides dys = ROW_STRIDES(dys);
    const RowStrides xs = ROW_STRIDES(xs);
    const RowStrides dxs = ROW_STRIDES(dxs);
    const int lane = threadIdx.x % 32, warps = blockDim.x / 32;
    for (index_t r = blockIdx.x * static_cast<index_t>(warps) + threadIdx.x / 32; r < samples * groups;
         r += static_cast<index_t>(gridDim.x) * warps) {
        const Row row{r / groups, r % groups, channels, inner, channels * inner, lane, 32};
        double a = 0.0, p = 0.0;
        if (TRAINED) {
            const SumPair sums = warp_reduce(row_gradient_sums(dy, dys, x, xs, row, mean[r], rstd[r], weight));
            a = centered ? from_lane0(sums.dy) / static_cast<double>(row.count) : 0.0;
            p = from_lane0(sums.dy_xmu) / static_cast<double>(row.count);
        }
        row_gradient<T, TRAINED>(dy, dys, x, xs, dx, dxs, row, mean[r], rstd[r], weight, a, p);
    }
}

// dweight and dbias: the sums of dy * x_hat and of dy for each (group, channel), over the samples
// in order, then the row's elements in order; a thread per parameter.
template <typename T> __global__ void __launch_bounds__(MAX_BLOCK, 1)
    rn_parameter_sums(const T* __restrict__ dy, ROW_STRIDE_PARAMS(dys), const T* __restrict__ x,
                      ROW_STRIDE_PARAMS(xs), index_t samples, index_t groups, index_t channels, index_t inner,
                      const double* __restrict__ mean, const double* __restrict__ rstd, double* __restrict__ dweight,
                      double* __restrict__ dbias) {
    const RowStrides dys = ROW_STRIDES(dys);
    const RowStrides xs = ROW_STRIDES(xs);
    for (index_t p = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; p < groups * channels;
         p += static_cast<index_t>(gridDim.x) * blockDim.x) {
        const index_t g = p / channels, k = p % channels;
        double dw = 0, db = 0;
        for (index_t n = 0; n < samples; ++n) {
            const double mu = mean[n * groups + g], r = rstd[n * groups + g];
            for (index_t s = 0; s < inner; ++s) {
                const double d = to_double(dy[dys.at(n, g, k, s)]);
                dw += d * ((to_double(x[xs.at(n, g, k, s)]) - mu) * r);
                db += d;
            }
        }
        dweight[p] = dw;
        dbias[p] = db;
    }
}

}  // namespace abn
