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

template <typename T> __global__ void __launch_bounds__(MAX_BLOCK, 1)
    rn_forward(const T* __restrict__ x, ROW_STRIDE_PARAMS(xs), T* __restrict__ y, ROW_STRIDE_PARAMS(ys),
               index_t samples, index_t groups, index_t channels, index_t inner, const double* __restrict__ weight,
               const double* __restrict__ bias, double eps, int centered, double* __restrict__ mean,
               double* __restrict__ var) {
    using A = typename Compute<T>::type;
    const RowStrides xs = ROW_STRIDES(xs);
    const RowStrides ys = ROW_STRIDES(ys);
    __shared__ Moments scratch[32];
    __shared__ double row_mean;
    __shared__ double row_var;
    const index_t count = channels * inner;
    for (index_t row = blockIdx.x; row < samples * groups; row += gridDim.x) {
        const index_t n = row / groups, g = row % groups;
        Moments m{0, 0, 0};
        for (index_t i = threadIdx.x; i < count; i += blockDim.x) {
            const double v = to_double(x[xs.at(n, g, i / inner, i % inner)]);
            m = merge(m, centered ? Moments{1, v, 0} : Moments{1, 0, v * v});
        }
        m = block_reduce(m, scratch, Moments{0, 0, 0});
        if (threadIdx.x == 0) {
            row_mean = centered ? m.mean : 0.0;
            row_var = m.m2 / static_cast<double>(count);
            mean[row] = row_mean;
            var[row] = row_var;
        }
        __syncthreads();
        const SplitMean<A> mu(row_mean);
        const double rstd = inverse_std(row_var, eps);
        for (index_t i = threadIdx.x; i < count; i += blockDim.x) {
            const index_t k = i / inner, s = i % inner, p = g * channels + k;
            const A a = static_cast<A>(rstd * weight[p]), b = static_cast<A>(bias[p]);
            y[ys.at(n, g, k, s)] = from_compute<T>(mu.centre(to_compute(x[xs.at(n, g, k, s)])) * a + b);
        }
        __syncthreads();  // row_mean and row_var are the next row's
    }
}

// dx = (weight * dy - a - x_hat * p) * rstd: with the statistics trained, a = mean(weight * dy)
// (0 without centring) and p = mean(weight * dy * x_hat); as constants, a = p = 0.
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
    const index_t count = channels * inner;
    for (index_t row = blockIdx.x; row < samples * groups; row += gridDim.x) {
        const index_t n = row / groups, g = row % groups;
        const double mu = mean[row], r = rstd[row];
        if (TRAINED) {
            SumPair sums{0, 0};
            for (index_t i = threadIdx.x; i < count; i += blockDim.x) {
                const index_t k = i / inner, s = i % inner;
                const double wd = weight[g * channels + k] * to_double(dy[dys.at(n, g, k, s)]);
                sums.dy += wd;
                sums.dy_xmu += wd * ((to_double(x[xs.at(n, g, k, s)]) - mu) * r);
            }
            sums = block_reduce(sums, scratch, SumPair{0, 0});
            if (threadIdx.x == 0) {
                row_a = centered ? sums.dy / static_cast<double>(count) : 0.0;
                row_p = sums.dy_xmu / static_cast<double>(count);
            }
            __syncthreads();
        }
        const double a = TRAINED ? row_a : 0.0, p = TRAINED ? row_p : 0.0;
        for (index_t i = threadIdx.x; i < count; i += blockDim.x) {
            const index_t k = i / inner, s = i % inner;
            const double x_hat = TRAINED ? (to_double(x[xs.at(n, g, k, s)]) - mu) * r : 0.0;
            const double d = to_double(dy[dys.at(n, g, k, s)]);
            dx[dxs.at(n, g, k, s)] = from_double<T>((weight[g * channels + k] * d - a - x_hat * p) * r);
        }
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
    using A = typename Compute<T>::type;
    const RowStrides xs = ROW_STRIDES(xs);
    const RowStrides ys = ROW_STRIDES(ys);
    const int lane = threadIdx.x % 32, warps = blockDim.x / 32;
    const index_t count = channels * inner;
    for (index_t row = blockIdx.x * static_cast<index_t>(warps) + threadIdx.x / 32; row < samples * groups;
         row += static_cast<index_t>(gridDim.x) * warps) {
        const index_t n = row / groups, g = row % groups;
        Moments m{0, 0, 0};
        for (index_t i = lane; i < count; i += 32) {
            const double v = to_double(x[xs.at(n, g, i / inner, i % inner)]);
            m = merge(m, centered ? Moments{1, v, 0} : Moments{1, 0, v * v});
        }
        m = warp_reduce(m);
        const double row_mean = from_lane0(centered ? m.mean : 0.0);
        const double row_var = from_lane0(m.m2 / static_cast<double>(count));
        if (lane == 0) {
            mean[row] = row_mean;
            var[row] = row_var;
        }
        const SplitMean<A> mu(row_mean);
        const double rstd = inverse_std(row_var, eps);
        for (index_t i = lane; i < count; i += 32) {
            const index_t k = i / inner, s = i % inner, p = g * channels + k;
            const A a = static_cast<A>(rstd * weight[p]), b = static_cast<A>(bias[p]);
            y[ys.at(n, g, k, s)] = from_compute<T>(mu.centre(to_compute(x[xs.at(n, g, k, s)])) * a + b);
        }
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
    const index_t count = channels * inner;
    for (index_t row = blockIdx.x * static_cast<index_t>(warps) + threadIdx.x / 32; row < samples * groups;
         row += static_cast<index_t>(gridDim.x) * warps) {
        const index_t n = row / groups, g = row % groups;
        const double mu = mean[row], r = rstd[row];
        double a = 0.0, p = 0.0;
        if (TRAINED) {
            SumPair sums{0, 0};
            for (index_t i = lane; i < count; i += 32) {
                const index_t k = i / inner, s = i % inner;
                const double wd = weight[g * channels + k] * to_double(dy[dys.at(n, g, k, s)]);
                sums.dy += wd;
                sums.dy_xmu += wd * ((to_double(x[xs.at(n, g, k, s)]) - mu) * r);
            }
            sums = warp_reduce(sums);
            a = centered ? from_lane0(sums.dy) / static_cast<double>(count) : 0.0;
            p = from_lane0(sums.dy_xmu) / static_cast<double>(count);
        }
        for (index_t i = lane; i < count; i += 32) {
            const index_t k = i / inner, s = i % inner;
            const double x_hat = TRAINED ? (to_double(x[xs.at(n, g, k, s)]) - mu) * r : 0.0;
            const double d = to_double(dy[dys.at(n, g, k, s)]);
            dx[dxs.at(n, g, k, s)] = from_double<T>((weight[g * channels + k] * d - a - x_hat * p) * r);
        }
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
