// Batch normalization's CUDA kernels (backends/cuda/batch_norm.py launches them), instantiated by
// name expression for each storage type T (float, double, __half, __nv_bfloat16) and vector width V
// (1, or 16 bytes' worth of T).
//
// Statistics, gradient sums and the gradient pass accumulate and compute in double, whatever the
// storage type: float sums of a channel whose mean is large against its spread lose the variance,
// values near the float limit overflow in differences, and a gradient that cancels far below dy
// loses its digits in float arithmetic. The normalize pass computes in float (double for double),
// as PyTorch does, with the mean split so that x - mean loses nothing. Per-channel numbers arrive
// and leave as double.

#include "common.cuh"

namespace abn {

// The normalize pass's epilogues, fused as cuDNN fuses them: none, a ReLU, or a residual added and then
// a ReLU. Each step rounds to T, as the unfused chain rounds each of its outputs; the ReLU's backward
// recomputes its input with the same functions, so its mask is the forward's bit for bit.
enum Epilogue { PLAIN = 0, RELU = 1, ADD_RELU = 2 };

template <typename T, int V, bool LOAD> __device__ __forceinline__ Pack<T, V> load_if(const T* p) {
    if constexpr (LOAD) return load<T, V>(p);
    return Pack<T, V>{};
}

// A channel's normalize: (x - mean) * scale + shift in the compute type, the mean split. One struct for
// the forward and the ReLU's backward, so that both compile the element's value alike.
template <typename A> struct ChannelAffine {
    SplitMean<A> mu;
    A scale, shift;
    ChannelAffine() = default;
    __device__ __forceinline__ ChannelAffine(const double* mean, const double* scale_, const double* shift_, index_t c)
        : mu(mean[c]), scale(static_cast<A>(scale_[c])), shift(static_cast<A>(shift_[c])) {}
    template <typename T> __device__ __forceinline__ A operator()(T x) const {
        return mu.centre(to_compute(x)) * scale + shift;
    }
};

template <typename T, bool RESIDUAL> __device__ __forceinline__ T relu_input(typename Compute<T>::type pre, T z) {
    T v = from_compute<T>(pre);
    if constexpr (RESIDUAL) v = from_compute<T>(to_compute(v) + to_compute(z));
    return v;
}

template <typename T, int E> __device__ __forceinline__ T finish(typename Compute<T>::type pre, T z) {
    using A = typename Compute<T>::type;
    const T v = relu_input<T, E == ADD_RELU>(pre, z);
    if constexpr (E != PLAIN) return to_compute(v) < A(0) ? from_compute<T>(A(0)) : v;  // NaN stays NaN
    return v;
}

// --- channels-first: (channel, tile) work items ----------------------------------------------------

template <typename T, int V> __global__ void __launch_bounds__(MAX_BLOCK, 1)
    cf_moments(const T* __restrict__ x, STRIDE_PARAMS(xs), index_t outer, index_t channels, index_t inner,
               index_t tiles, index_t tile_vectors, double* __restrict__ part_mean,
               double* __restrict__ part_m2, index_t* __restrict__ part_n) {
    const Strides xs = STRIDES(xs);
    __shared__ Moments scratch[32];
    const index_t cols = inner / V, vectors = outer * cols;
    for (index_t item = blockIdx.x; item < channels * tiles; item += gridDim.x) {
        const Tile tile(item, tiles, tile_vectors, vectors);
        Moments m{0, 0, 0};
        Cursor at(tile.begin + threadIdx.x, blockDim.x, cols);
        for (index_t v = tile.begin + threadIdx.x; v < tile.end; v += blockDim.x, at.advance())
            m = merge(m, pack_moments(load<T, V>(x + xs.at(at.row, tile.channel, at.col * V))));
        m = block_reduce(m, scratch, Moments{0, 0, 0});
        if (threadIdx.x == 0) {
            part_mean[item] = m.mean;
            part_m2[item] = m.m2;
            part_n[item] = m.n;
        }
    }
}

template <typename T, int V, int E> __global__ void __launch_bounds__(MAX_BLOCK, 1)
    cf_normalize(const T* __restrict__ x, STRIDE_PARAMS(xs), const T* __restrict__ z, STRIDE_PARAMS(zs),
                 T* __restrict__ y, STRIDE_PARAMS(ys), index_t outer, index_t channels, index_t inner, index_t tiles,
                 index_t tile_vectors, const double* __restrict__ mean, const double* __restrict__ scale,
                 const double* __restrict__ bias) {
    using A = typename Compute<T>::type;
    const Strides xs = STRIDES(xs);
    const Strides zs = STRIDES(zs);
    const Strides ys = STRIDES(ys);
    const index_t cols = inner / V, vectors = outer * cols, items = channels * tiles;
    for (index_t i = blockIdx.x; i < items; i += gridDim.x) {
        const Tile tile(items - 1 - i, tiles, tile_vectors, vectors);
        const ChannelAffine<A> affine(mean, scale, bias, tile.channel);
        Cursor at(tile.begin + threadIdx.x, blockDim.x, cols);
        for (index_t v = tile.begin + threadIdx.x; v < tile.end; v += blockDim.x, at.advance()) {
            Pack<T, V> p = load<T, V>(x + xs.at(at.row, tile.channel, at.col * V));
            const Pack<T, V> r = load_if<T, V, E == ADD_RELU>(z + zs.at(at.row, tile.channel, at.col * V));
#pragma unroll
            for (int j = 0; j < V; ++j) p.v[j] = finish<T, E>(affine(p.v[j]), r.v[j]);
            store<T, V>(y + ys.at(at.row, tile.channel, at.col * V), p);
        }
    }
}

template <typename T, int V> __global__ void __launch_bounds__(MAX_BLOCK, 1)
    cf_gradient_sums(const T* __restrict__ dy, STRIDE_PARAMS(dys), const T* __restrict__ x, STRIDE_PARAMS(xs),
                     index_t outer, index_t channels, index_t inner, index_t tiles, index_t tile_vectors,
                     const double* __restrict__ mean, double* __restrict__ part_dy,
                     double* __restrict__ part_dy_xmu) {
    const Strides dys = STRIDES(dys);
    const Strides xs = STRIDES(xs);
    __shared__ SumPair scratch[32];
    const index_t cols = inner / V, vectors = outer * cols;
    for (index_t item = blockIdx.x; item < channels * tiles; item += gridDim.x) {
        const Tile tile(item, tiles, tile_vectors, vectors);
        const double mu = mean[tile.channel];
        SumPair s{0, 0};
        Cursor at(tile.begin + threadIdx.x, blockDim.x, cols);
        for (index_t v = tile.begin + threadIdx.x; v < tile.end; v += blockDim.x, at.advance()) {
            const Pack<T, V> g = load<T, V>(dy + dys.at(at.row, tile.channel, at.col * V));
            const Pack<T, V> p = load<T, V>(x + xs.at(at.row, tile.channel, at.col * V));
#pragma unroll
            for (int j = 0; j < V; ++j) {
                const double d = to_double(g.v[j]);
                s.dy += d;
                s.dy_xmu += d * (to_double(p.v[j]) - mu);
            }
        }
        s = block_reduce(s, scratch, SumPair{0, 0});
        if (threadIdx.x == 0) {
            part_dy[item] = s.dy;
            part_dy_xmu[item] = s.dy_xmu;
        }
    }
}

// dx = (dy - mean_dy - (x - mean) * k) * scale when training; dx = dy * scale with frozen statistics,
// whatever x holds (so the frozen pass does not read x at all).
template <bool TRAINING> struct GradientCoefficients {
    double mean, mean_dy, k, scale;
    GradientCoefficients() = default;
    __device__ __forceinline__ GradientCoefficients(const double* mean_, const double* mean_dy_, const double* k_,
                                                    const double* scale_, index_t c)
        : mean(mean_[c]), mean_dy(mean_dy_[c]), k(k_[c]), scale(scale_[c]) {}
    __device__ __forceinline__ double operator()(double dy, double x) const {
        if constexpr (TRAINING) return (dy - mean_dy - (x - mean) * k) * scale;
        return dy * scale;
    }
};

template <typename T, int V, bool TRAINING> __global__ void __launch_bounds__(MAX_BLOCK, 1)
    cf_gradient(const T* __restrict__ dy, STRIDE_PARAMS(dys), const T* __restrict__ x, STRIDE_PARAMS(xs),
                T* __restrict__ dx, STRIDE_PARAMS(dxs), index_t outer, index_t channels, index_t inner, index_t tiles,
                index_t tile_vectors, const double* __restrict__ mean, const double* __restrict__ mean_dy,
                const double* __restrict__ k, const double* __restrict__ scale) {
    const Strides dxs = STRIDES(dxs);
    const Strides dys = STRIDES(dys);
    const Strides xs = STRIDES(xs);
    const index_t cols = inner / V, vectors = outer * cols, items = channels * tiles;
    for (index_t i = blockIdx.x; i < items; i += gridDim.x) {
        const Tile tile(items - 1 - i, tiles, tile_vectors, vectors);
        const GradientCoefficients<TRAINING> grad(mean, mean_dy, k, scale, tile.channel);
        Cursor at(tile.begin + threadIdx.x, blockDim.x, cols);
        for (index_t v = tile.begin + threadIdx.x; v < tile.end; v += blockDim.x, at.advance()) {
            Pack<T, V> g = load<T, V>(dy + dys.at(at.row, tile.channel, at.col * V));
            const Pack<T, V> p = load_if<T, V, TRAINING>(x + xs.at(at.row, tile.channel, at.col * V));
#pragma unroll
            for (int j = 0; j < V; ++j) g.v[j] = from_double<T>(grad(to_double(g.v[j]), to_double(p.v[j])));
            store<T, V>(dx + dxs.at(at.row, tile.channel, at.col * V), g);
        }
    }
}

// --- channels-last: (channel block, row tile) work items -------------------------------------------

template <typename T, int V> __global__ void __launch_bounds__(MAX_BLOCK, 1)
    cl_moments(const T* __restrict__ x, STRIDE_PARAMS(xs), index_t rows, index_t channels, int lanes, index_t tile_rows,
               index_t row_tiles, double* __restrict__ part_mean,
               double* __restrict__ part_m2, index_t* __restrict__ part_n) {
    const Strides xs = STRIDES(xs);
    extern __shared__ unsigned char shared[];
    Moments* scratch = reinterpret_cast<Moments*>(shared);
    const index_t channel_blocks = (channels + lanes * V - 1) / (lanes * V);
    const int lane = threadIdx.x % lanes, row0 = threadIdx.x / lanes, row_step = blockDim.x / lanes;
    for (index_t item = blockIdx.x; item < channel_blocks * row_tiles; item += gridDim.x) {
        const RowTile tile(item, channel_blocks, lanes, V, tile_rows, rows);
        const index_t c = tile.channel0 + lane * V;
        // Welford over this thread's rows; its V channels share the count.
        index_t n = 0;
        double mean[V], m2[V];
#pragma unroll
        for (int j = 0; j < V; ++j) mean[j] = m2[j] = 0;
        if (c < channels) {
            for (index_t r = tile.row_begin + row0; r < tile.row_end; r += row_step) {
                const Pack<T, V> p = load<T, V>(x + xs.at(r, c, 0));
                const double weight = 1.0 / static_cast<double>(++n);
#pragma unroll
                for (int j = 0; j < V; ++j) {
                    const double v = to_double(p.v[j]), d = v - mean[j];
                    mean[j] += d * weight;
                    m2[j] += d * (v - mean[j]);
                }
            }
        }
        const index_t tile_index = item / channel_blocks;
#pragma unroll
        for (int j = 0; j < V; ++j) {
            const Moments total = reduce_rows(Moments{n, mean[j], m2[j]}, scratch, lanes);
            if (row0 == 0 && c + j < channels) {
                part_mean[(c + j) * row_tiles + tile_index] = total.mean;
                part_m2[(c + j) * row_tiles + tile_index] = total.m2;
                part_n[(c + j) * row_tiles + tile_index] = total.n;
            }
        }
    }
}

template <typename T, int V, int E> __global__ void __launch_bounds__(MAX_BLOCK, 1)
    cl_normalize(const T* __restrict__ x, STRIDE_PARAMS(xs), const T* __restrict__ z, STRIDE_PARAMS(zs),
                 T* __restrict__ y, STRIDE_PARAMS(ys), index_t rows, index_t channels, int lanes, index_t tile_rows,
                 index_t row_tiles, const double* __restrict__ mean, const double* __restrict__ scale,
                 const double* __restrict__ bias) {
    using A = typename Compute<T>::type;
    const Strides xs = STRIDES(xs);
    const Strides zs = STRIDES(zs);
    const Strides ys = STRIDES(ys);
    const index_t channel_blocks = (channels + lanes * V - 1) / (lanes * V), items = channel_blocks * row_tiles;
    const int lane = threadIdx.x % lanes, row0 = threadIdx.x / lanes, row_step = blockDim.x / lanes;
    for (index_t i = blockIdx.x; i < items; i += gridDim.x) {
        const RowTile tile(items - 1 - i, channel_blocks, lanes, V, tile_rows, rows);
        const index_t c = tile.channel0 + lane * V;
        if (c >= channels) continue;
        ChannelAffine<A> affine[V];
#pragma unroll
        for (int j = 0; j < V; ++j) affine[j] = ChannelAffine<A>(mean, scale, bias, c + j);
        for (index_t r = tile.row_begin + row0; r < tile.row_end; r += row_step) {
            Pack<T, V> p = load<T, V>(x + xs.at(r, c, 0));
            const Pack<T, V> q = load_if<T, V, E == ADD_RELU>(z + zs.at(r, c, 0));
#pragma unroll
            for (int j = 0; j < V; ++j) p.v[j] = finish<T, E>(affine[j](p.v[j]), q.v[j]);
            store<T, V>(y + ys.at(r, c, 0), p);
        }
    }
}

template <typename T, int V> __global__ void __launch_bounds__(MAX_BLOCK, 1)
    cl_gradient_sums(const T* __restrict__ dy, STRIDE_PARAMS(dys), const T* __restrict__ x, STRIDE_PARAMS(xs),
                     index_t rows, index_t channels, int lanes, index_t tile_rows, index_t row_tiles,
                     const double* __restrict__ mean, double* __restrict__ part_dy,
                     double* __restrict__ part_dy_xmu) {
    const Strides dys = STRIDES(dys);
    const Strides xs = STRIDES(xs);
    extern __shared__ unsigned char shared[];
    SumPair* scratch = reinterpret_cast<SumPair*>(shared);
    const index_t channel_blocks = (channels + lanes * V - 1) / (lanes * V);
    const int lane = threadIdx.x % lanes, row0 = threadIdx.x / lanes, row_step = blockDim.x / lanes;
    for (index_t item = blockIdx.x; item < channel_blocks * row_tiles; item += gridDim.x) {
        const RowTile tile(item, channel_blocks, lanes, V, tile_rows, rows);
        const index_t c = tile.channel0 + lane * V;
        SumPair s[V];
        double mu[V];
#pragma unroll
        for (int j = 0; j < V; ++j) s[j] = {0, 0};
        if (c < channels) {
#pragma unroll
            for (int j = 0; j < V; ++j) mu[j] = mean[c + j];
            for (index_t r = tile.row_begin + row0; r < tile.row_end; r += row_step) {
                const Pack<T, V> g = load<T, V>(dy + dys.at(r, c, 0));
                const Pack<T, V> p = load<T, V>(x + xs.at(r, c, 0));
#pragma unroll
                for (int j = 0; j < V; ++j) {
                    const double d = to_double(g.v[j]);
                    s[j].dy += d;
                    s[j].dy_xmu += d * (to_double(p.v[j]) - mu[j]);
                }
            }
        }
        const index_t tile_index = item / channel_blocks;
#pragma unroll
        for (int j = 0; j < V; ++j) {
            const SumPair total = reduce_rows(s[j], scratch, lanes);
            if (row0 == 0 && c + j < channels) {
                part_dy[(c + j) * row_tiles + tile_index] = total.dy;
                part_dy_xmu[(c + j) * row_tiles + tile_index] = total.dy_xmu;
            }
        }
    }
}

template <typename T, int V, bool TRAINING> __global__ void __launch_bounds__(MAX_BLOCK, 1)
    cl_gradient(const T* __restrict__ dy, STRIDE_PARAMS(dys), const T* __restrict__ x, STRIDE_PARAMS(xs),
                T* __restrict__ dx, STRIDE_PARAMS(dxs), index_t rows, index_t channels, int lanes, index_t tile_rows,
                index_t row_tiles, const double* __restrict__ mean, const double* __restrict__ mean_dy,
                const double* __restrict__ k, const double* __restrict__ scale) {
    const Strides dxs = STRIDES(dxs);
    const Strides dys = STRIDES(dys);
    const Strides xs = STRIDES(xs);
    const index_t channel_blocks = (channels + lanes * V - 1) / (lanes * V), items = channel_blocks * row_tiles;
    const int lane = threadIdx.x % lanes, row0 = threadIdx.x / lanes, row_step = blockDim.x / lanes;
    for (index_t i = blockIdx.x; i < items; i += gridDim.x) {
        const RowTile tile(items - 1 - i, channel_blocks, lanes, V, tile_rows, rows);
        const index_t c = tile.channel0 + lane * V;
        if (c >= channels) continue;
        GradientCoefficients<TRAINING> grad[V];
#pragma unroll
        for (int j = 0; j < V; ++j) grad[j] = GradientCoefficients<TRAINING>(mean, mean_dy, k, scale, c + j);
        for (index_t r = tile.row_begin + row0; r < tile.row_end; r += row_step) {
            Pack<T, V> g = load<T, V>(dy + dys.at(r, c, 0));
            const Pack<T, V> p = load_if<T, V, TRAINING>(x + xs.at(r, c, 0));
#pragma unroll
            for (int j = 0; j < V; ++j) g.v[j] = from_double<T>(grad[j](to_double(g.v[j]), to_double(p.v[j])));
            store<T, V>(dx + dxs.at(r, c, 0), g);
        }
    }
}

// --- the fused ReLU's backward: g = dy where the ReLU's input (recomputed by the forward's formula)
// was not <= 0, else 0 -----------------------------------------------------------------------------

template <typename T, int V, bool RESIDUAL> __global__ void __launch_bounds__(MAX_BLOCK, 1)
    cf_relu_gradient(const T* __restrict__ dy, STRIDE_PARAMS(dys), const T* __restrict__ x, STRIDE_PARAMS(xs),
                     const T* __restrict__ z, STRIDE_PARAMS(zs), T* __restrict__ g, STRIDE_PARAMS(gs), index_t outer,
                     index_t channels, index_t inner, index_t tiles, index_t tile_vectors,
                     const double* __restrict__ mean, const double* __restrict__ scale,
                     const double* __restrict__ shift) {
    using A = typename Compute<T>::type;
    const Strides dys = STRIDES(dys);
    const Strides xs = STRIDES(xs);
    const Strides zs = STRIDES(zs);
    const Strides gs = STRIDES(gs);
    const index_t cols = inner / V, vectors = outer * cols, items = channels * tiles;
    for (index_t i = blockIdx.x; i < items; i += gridDim.x) {
        const Tile tile(i, tiles, tile_vectors, vectors);
        const ChannelAffine<A> affine(mean, scale, shift, tile.channel);
        Cursor at(tile.begin + threadIdx.x, blockDim.x, cols);
        for (index_t v = tile.begin + threadIdx.x; v < tile.end; v += blockDim.x, at.advance()) {
            Pack<T, V> d = load<T, V>(dy + dys.at(at.row, tile.channel, at.col * V));
            const Pack<T, V> p = load<T, V>(x + xs.at(at.row, tile.channel, at.col * V));
            const Pack<T, V> r = load_if<T, V, RESIDUAL>(z + zs.at(at.row, tile.channel, at.col * V));
#pragma unroll
            for (int j = 0; j < V; ++j) {
                const T in = relu_input<T, RESIDUAL>(affine(p.v[j]), r.v[j]);
                if (to_compute(in) <= A(0)) d.v[j] = from_compute<T>(A(0));
            }
            store<T, V>(g + gs.at(at.row, tile.channel, at.col * V), d);
        }
    }
}

template <typename T, int V, bool RESIDUAL> __global__ void __launch_bounds__(MAX_BLOCK, 1)
    cl_relu_gradient(const T* __restrict__ dy, STRIDE_PARAMS(dys), const T* __restrict__ x, STRIDE_PARAMS(xs),
                     const T* __restrict__ z, STRIDE_PARAMS(zs), T* __restrict__ g, STRIDE_PARAMS(gs), index_t rows,
                     index_t channels, int lanes, index_t tile_rows, index_t row_tiles,
                     const double* __restrict__ mean, const double* __restrict__ scale,
                     const double* __restrict__ shift) {
    using A = typename Compute<T>::type;
    const Strides dys = STRIDES(dys);
    const Strides xs = STRIDES(xs);
    const Strides zs = STRIDES(zs);
    const Strides gs = STRIDES(gs);
    const index_t channel_blocks = (channels + lanes * V - 1) / (lanes * V), items = channel_blocks * row_tiles;
    const int lane = threadIdx.x % lanes, row0 = threadIdx.x / lanes, row_step = blockDim.x / lanes;
    for (index_t i = blockIdx.x; i < items; i += gridDim.x) {
        const RowTile tile(i, channel_blocks, lanes, V, tile_rows, rows);
        const index_t c = tile.channel0 + lane * V;
        if (c >= channels) continue;
        ChannelAffine<A> affine[V];
#pragma unroll
        for (int j = 0; j < V; ++j) affine[j] = ChannelAffine<A>(mean, scale, shift, c + j);
        for (index_t r = tile.row_begin + row0; r < tile.row_end; r += row_step) {
            Pack<T, V> d = load<T, V>(dy + dys.at(r, c, 0));
            const Pack<T, V> p = load<T, V>(x + xs.at(r, c, 0));
            const Pack<T, V> q = load_if<T, V, RESIDUAL>(z + zs.at(r, c, 0));
#pragma unroll
            for (int j = 0; j < V; ++j) {
                const T in = relu_input<T, RESIDUAL>(affine[j](p.v[j]), q.v[j]);
                if (to_compute(in) <= A(0)) d.v[j] = from_compute<T>(A(0));
            }
            store<T, V>(g + gs.at(r, c, 0), d);
        }
    }
}

// --- per-channel finishing: one thread per channel, partials merged in tile order, in double ------

// The backend needs the scale before the normalize launch, and computing it here saves a chain of
// small launches. The normalize kernels take the
// bias as it is: they compute (x - mean) * scale + bias.
__global__ void finish_moments(const double* __restrict__ part_mean, const double* __restrict__ part_m2,
                               const index_t* __restrict__ part_n, index_t channels, index_t tiles,
                               const double* __restrict__ weight, double eps, double* __restrict__ mean,
                               double* __restrict__ var, double* __restrict__ scale) {
    for (index_t c = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; c < channels;
         c += static_cast<index_t>(gridDim.x) * blockDim.x) {
        Moments m{0, 0, 0};
        for (index_t t = 0; t < tiles; ++t) {
            const index_t i = c * tiles + t;
            m = merge(m, Moments{part_n[i], part_mean[i], part_m2[i]});
        }
        const double v = m.m2 / static_cast<double>(m.n);
        mean[c] = m.mean;
        var[c] = v;
        scale[c] = weight[c] * inverse_std(v, eps);
    }
}

__global__ void finish_gradient_sums(const double* __restrict__ part_dy, const double* __restrict__ part_dy_xmu, index_t channels,
                                     index_t tiles, const double* __restrict__ invstd,
                                     const double* __restrict__ weight, double count, double* __restrict__ sum_dy,
                                     double* __restrict__ sum_dy_xmu, double* __restrict__ mean_dy,
                                     double* __restrict__ k, double* __restrict__ scale) {
    for (index_t c = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; c < channels;
         c += static_cast<index_t>(gridDim.x) * blockDim.x) {
        double s = 0, sx = 0;
        for (index_t t = 0; t < tiles; ++t) {
            s += part_dy[c * tiles + t];
            sx += part_dy_xmu[c * tiles + t];
        }
        sum_dy[c] = s;
        sum_dy_xmu[c] = sx;
        const BackwardCoefficients b = backward_coefficients(s, sx, invstd[c], weight[c], count);
        mean_dy[c] = b.mean_dy;
        k[c] = b.k;
        scale[c] = b.scale;
    }
}

}  // namespace abn
