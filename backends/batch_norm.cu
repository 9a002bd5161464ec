// CUDA kernels of the CuPy backend (backends/cupy_gpu.py), compiled with NVRTC through
// cupy.RawModule and instantiated by name expression for each storage type T (float, double,
// __half, __nv_bfloat16) and vector width V (1, or 16 bytes' worth of T).
//
// Every kernel works on the front's canonical view (outer, C, inner) of an array, passed as a base
// pointer and three element strides, with 64-bit indexing. Work is cut into fixed work items
// (a channel's tile, or a block of channels by a range of rows) that depend only on the shape and
// the launch constants, never on the device; blocks loop over work items, so any number of items
// fits in a 1-D grid. Reductions merge in a fixed order (warp shuffles, then warps, then tiles in
// tile order) and use no atomics, so results are bitwise identical run to run.
//
// Statistics, gradient sums and the gradient pass accumulate and compute in double, whatever the
// storage type: float sums of a channel whose mean is large against its spread lose the variance,
// values near the float limit overflow in differences, and a gradient that cancels far below dy
// loses its digits in float arithmetic. The normalize pass computes in float
// (double for double), as PyTorch does, with the mean split so that x - mean loses nothing.
// Per-channel numbers arrive and leave as double.
// Two loop families:
//   channels-first (inner > 1: NCHW, NCL, NCDHW): a channel's outer x inner elements are one flat
//     range of vectors, cut into tiles; a block does one (channel, tile) item.
//   channels-last (inner == 1: NHWC, (N, C)): rows of C channels; a block's threads cover a block
//     of channel vectors (x) by rows (y), and a work item is (channel block, row tile).

#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace abn {

using index_t = long long;

// Threads per block at most (backends/cupy_gpu.py BLOCK); it lets ptxas use up to 255 registers.
#define MAX_BLOCK 256

// The type the normalize pass computes in.
template <typename T> struct Compute {
    using type = float;
};
template <> struct Compute<double> {
    using type = double;
};

__device__ __forceinline__ float to_compute(float v) { return v; }
__device__ __forceinline__ double to_compute(double v) { return v; }
__device__ __forceinline__ float to_compute(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_compute(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ double to_double(T v) { return static_cast<double>(to_compute(v)); }

template <typename T> __device__ __forceinline__ T from_compute(typename Compute<T>::type v);
template <> __device__ __forceinline__ float from_compute<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_compute<double>(double v) { return v; }
template <> __device__ __forceinline__ __half from_compute<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_compute<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}

// A double result stored as T (through float for the half types).
template <typename T> __device__ __forceinline__ T from_double(double v) {
    return from_compute<T>(static_cast<typename Compute<T>::type>(v));
}

// V consecutive elements, loaded and stored as one 16-byte access when V > 1.
template <typename T, int V> struct alignas(sizeof(T) * V) Pack {
    T v[V];
};

template <typename T, int V> __device__ __forceinline__ Pack<T, V> load(const T* p) {
    return *reinterpret_cast<const Pack<T, V>*>(p);
}

template <typename T, int V> __device__ __forceinline__ void store(T* p, const Pack<T, V>& pack) {
    *reinterpret_cast<Pack<T, V>*>(p) = pack;
}

// A per-channel mean as hi + lo in the accumulation type: x - hi is exact for x near the mean,
// so (x - hi) - lo keeps the precision a rounded mean would lose (mean 1e4, std 1e-2 in float).
template <typename A> struct SplitMean {
    A hi, lo;
    SplitMean() = default;
    __device__ __forceinline__ explicit SplitMean(double mean)
        : hi(static_cast<A>(mean)), lo(static_cast<A>(mean - static_cast<double>(static_cast<A>(mean)))) {}
    __device__ __forceinline__ A centre(A x) const { return (x - hi) - lo; }
};

// --- statistics: count, mean and sum of squared deviations, merged with Chan's formula -----------

struct Moments {
    index_t n;
    double mean, m2;
};

__device__ __forceinline__ Moments merge(Moments a, Moments b) {
    if (b.n == 0) return a;
    if (a.n == 0) return b;
    const index_t n = a.n + b.n;
    const double delta = b.mean - a.mean;
    const double wb = static_cast<double>(b.n) / static_cast<double>(n);
    return {n, a.mean + delta * wb, a.m2 + b.m2 + delta * delta * static_cast<double>(a.n) * wb};
}

// The moments of one pack of V values (two passes over registers).
template <typename T, int V> __device__ __forceinline__ Moments pack_moments(const Pack<T, V>& p) {
    double sum = 0;
#pragma unroll
    for (int j = 0; j < V; ++j) sum += to_double(p.v[j]);
    const double mean = sum / V;
    double m2 = 0;
#pragma unroll
    for (int j = 0; j < V; ++j) {
        const double d = to_double(p.v[j]) - mean;
        m2 += d * d;
    }
    return {V, mean, m2};
}

constexpr unsigned FULL_MASK = 0xffffffffu;

__device__ __forceinline__ Moments shuffle_down(const Moments& m, int offset) {
    return {__shfl_down_sync(FULL_MASK, m.n, offset), __shfl_down_sync(FULL_MASK, m.mean, offset),
            __shfl_down_sync(FULL_MASK, m.m2, offset)};
}

__device__ __forceinline__ Moments combine(const Moments& a, const Moments& b) { return merge(a, b); }

// Two sums travel together through the gradient reductions.
struct SumPair {
    double dy, dy_xmu;
};

__device__ __forceinline__ SumPair shuffle_down(const SumPair& s, int offset) {
    return {__shfl_down_sync(FULL_MASK, s.dy, offset), __shfl_down_sync(FULL_MASK, s.dy_xmu, offset)};
}

__device__ __forceinline__ SumPair combine(const SumPair& a, const SumPair& b) {
    return {a.dy + b.dy, a.dy_xmu + b.dy_xmu};
}

// Reduces a value over the whole block in a fixed tree order; the result is valid in thread 0.
// blockDim.x must be a multiple of 32 (at most MAX_BLOCK); `scratch` holds 32 values.
template <typename R> __device__ __forceinline__ R block_reduce(R value, R* scratch, R zero) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) value = combine(value, shuffle_down(value, offset));
    if (lane == 0) scratch[warp] = value;
    __syncthreads();
    if (warp == 0) {
        value = lane < warps ? scratch[lane] : zero;
#pragma unroll
        for (int offset = 16; offset > 0; offset /= 2) value = combine(value, shuffle_down(value, offset));
    }
    __syncthreads();  // scratch is reused by the next work item
    return value;
}

// --- channels-first: (channel, tile) work items ----------------------------------------------------

// Walks one channel's (row, vector column) positions in steps of `step` vectors without dividing
// per step: a block's threads start at consecutive vectors and advance together.
struct Cursor {
    index_t row, col, cols, step_rows, step_cols;
    __device__ __forceinline__ Cursor(index_t start, index_t step, index_t cols_)
        : row(start / cols_), col(start % cols_), cols(cols_), step_rows(step / cols_), step_cols(step % cols_) {}
    __device__ __forceinline__ void advance() {
        row += step_rows;
        col += step_cols;
        if (col >= cols) {
            col -= cols;
            ++row;
        }
    }
};

// Element strides of one array in the (outer, C, inner) view. Kernels take them as three scalars
// (what CuPy passes) and gather them with STRIDES.
#define STRIDE_PARAMS(name) index_t name##_outer, index_t name##_channel, index_t name##_inner
#define STRIDES(name) \
    Strides { name##_outer, name##_channel, name##_inner }
struct Strides {
    index_t outer, channel, inner;
    __device__ __forceinline__ index_t at(index_t row, index_t channel_, index_t element) const {
        return row * outer + channel_ * channel + element * inner;
    }
};

// One block's share of channels-first work: channel c, vectors [begin, end) of the channel's
// outer * (inner / V) vectors. Items run in reverse in the element passes so that a pass starts
// where the statistics pass ended, on data still in L2.
struct Tile {
    index_t channel, begin, end;
    __device__ __forceinline__ Tile(index_t item, index_t tiles, index_t tile_vectors, index_t vectors)
        : channel(item / tiles), begin((item % tiles) * tile_vectors), end(min(begin + tile_vectors, vectors)) {}
};

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

template <typename T, int V> __global__ void __launch_bounds__(MAX_BLOCK, 1)
    cf_normalize(const T* __restrict__ x, STRIDE_PARAMS(xs), T* __restrict__ y, STRIDE_PARAMS(ys), index_t outer,
                 index_t channels, index_t inner, index_t tiles, index_t tile_vectors, const double* __restrict__ mean,
                 const double* __restrict__ scale, const double* __restrict__ bias) {
    using A = typename Compute<T>::type;
    const Strides xs = STRIDES(xs);
    const Strides ys = STRIDES(ys);
    const index_t cols = inner / V, vectors = outer * cols, items = channels * tiles;
    for (index_t i = blockIdx.x; i < items; i += gridDim.x) {
        const Tile tile(items - 1 - i, tiles, tile_vectors, vectors);
        const SplitMean<A> mu(mean[tile.channel]);
        const A a = static_cast<A>(scale[tile.channel]), b = static_cast<A>(bias[tile.channel]);
        Cursor at(tile.begin + threadIdx.x, blockDim.x, cols);
        for (index_t v = tile.begin + threadIdx.x; v < tile.end; v += blockDim.x, at.advance()) {
            Pack<T, V> p = load<T, V>(x + xs.at(at.row, tile.channel, at.col * V));
#pragma unroll
            for (int j = 0; j < V; ++j) p.v[j] = from_compute<T>(mu.centre(to_compute(p.v[j])) * a + b);
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

template <typename T, int V, bool TRAINING> __device__ __forceinline__ Pack<T, V> load_x(const T* p) {
    if constexpr (TRAINING) return load<T, V>(p);
    return Pack<T, V>{};
}

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
            const Pack<T, V> p = load_x<T, V, TRAINING>(x + xs.at(at.row, tile.channel, at.col * V));
#pragma unroll
            for (int j = 0; j < V; ++j) g.v[j] = from_double<T>(grad(to_double(g.v[j]), to_double(p.v[j])));
            store<T, V>(dx + dxs.at(at.row, tile.channel, at.col * V), g);
        }
    }
}

// --- channels-last: (channel block, row tile) work items -------------------------------------------
// threadIdx.x % lanes picks a vector of V channels, threadIdx.x / lanes a row; `lanes` is a power of
// two dividing blockDim.x. A work item covers lanes * V channels by `tile_rows` rows.

struct RowTile {
    index_t channel0, row_begin, row_end;
    __device__ __forceinline__ RowTile(index_t item, index_t channel_blocks, int lanes, int V, index_t tile_rows,
                                       index_t rows)
        : channel0((item % channel_blocks) * lanes * V),
          row_begin((item / channel_blocks) * tile_rows),
          row_end(min(row_begin + tile_rows, rows)) {}
};

// Merges each thread's value with those of the threads on the other rows of its channel lane, in
// a fixed tree order through shared memory (`scratch` holds blockDim.x values); thread rows 0 end
// with the block's result for their lane.
template <typename R> __device__ __forceinline__ R reduce_rows(R value, R* scratch, int lanes) {
    const int lane = threadIdx.x % lanes, row = threadIdx.x / lanes;
    for (int half = blockDim.x / lanes / 2; half > 0; half /= 2) {
        if (row >= half && row < 2 * half) scratch[(row - half) * lanes + lane] = value;
        __syncthreads();
        if (row < half) value = combine(value, scratch[row * lanes + lane]);
        __syncthreads();
    }
    return value;
}

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

template <typename T, int V> __global__ void __launch_bounds__(MAX_BLOCK, 1)
    cl_normalize(const T* __restrict__ x, STRIDE_PARAMS(xs), T* __restrict__ y, STRIDE_PARAMS(ys), index_t rows,
                 index_t channels, int lanes, index_t tile_rows, index_t row_tiles, const double* __restrict__ mean,
                 const double* __restrict__ scale, const double* __restrict__ bias) {
    using A = typename Compute<T>::type;
    const Strides xs = STRIDES(xs);
    const Strides ys = STRIDES(ys);
    const index_t channel_blocks = (channels + lanes * V - 1) / (lanes * V), items = channel_blocks * row_tiles;
    const int lane = threadIdx.x % lanes, row0 = threadIdx.x / lanes, row_step = blockDim.x / lanes;
    for (index_t i = blockIdx.x; i < items; i += gridDim.x) {
        const RowTile tile(items - 1 - i, channel_blocks, lanes, V, tile_rows, rows);
        const index_t c = tile.channel0 + lane * V;
        if (c >= channels) continue;
        SplitMean<A> mu[V];
        A a[V], b[V];
#pragma unroll
        for (int j = 0; j < V; ++j) {
            mu[j] = SplitMean<A>(mean[c + j]);
            a[j] = static_cast<A>(scale[c + j]);
            b[j] = static_cast<A>(bias[c + j]);
        }
        for (index_t r = tile.row_begin + row0; r < tile.row_end; r += row_step) {
            Pack<T, V> p = load<T, V>(x + xs.at(r, c, 0));
#pragma unroll
            for (int j = 0; j < V; ++j) p.v[j] = from_compute<T>(mu[j].centre(to_compute(p.v[j])) * a[j] + b[j]);
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
            const Pack<T, V> p = load_x<T, V, TRAINING>(x + xs.at(r, c, 0));
#pragma unroll
            for (int j = 0; j < V; ++j) g.v[j] = from_double<T>(grad[j](to_double(g.v[j]), to_double(p.v[j])));
            store<T, V>(dx + dxs.at(r, c, 0), g);
        }
    }
}

// --- per-channel finishing: one thread per channel, partials merged in tile order, in double ------

// Mirrors accelbn/_formulas.py (inverse_std): the backend needs the scale before the normalize
// launch, and computing it here saves a chain of small launches. The normalize kernels take the
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
        scale[c] = weight[c] * (1.0 / sqrt(v + eps));
    }
}

// Mirrors accelbn/_formulas.py (backward_coefficients) for the same reason.
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
        mean_dy[c] = s / count;
        k[c] = sx * invstd[c] * invstd[c] / count;
        scale[c] = weight[c] * invstd[c];
    }
}

}  // namespace abn
