// What every CUDA source of the CuPy backend shares (backends/cuda/launcher.py inlines this file
// where a source includes it): storage and compute types, 16-byte packs, the per-channel formulas
// of backends/formulas.py, strided addressing, fixed-order reductions and the work items.
//
// Every kernel works on the front's canonical view (outer, C, inner) of an array, passed as a base
// pointer and three element strides, with 64-bit indexing. Work is cut into fixed work items
// (a channel's tile, or a block of channels by a range of rows) that depend only on the shape and
// the launch constants, never on the device; blocks loop over work items, so any number of items
// fits in a 1-D grid. Reductions merge in a fixed order (warp shuffles, then warps, then tiles in
// tile order) and use no atomics, so results are bitwise identical run to run.
//
// Two loop families:
//   channels-first (inner > 1: NCHW, NCL, NCDHW): a channel's outer x inner elements are one flat
//     range of vectors, cut into tiles; a block does one (channel, tile) item.
//   channels-last (inner == 1: NHWC, (N, C)): rows of C channels; a block's threads cover a block
//     of channel vectors (x) by rows (y), and a work item is (channel block, row tile).

#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace abn {

using index_t = long long;

// Threads per block at most (backends/cuda/launcher.py BLOCK); it lets ptxas use up to 255 registers.
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

// --- the per-channel formulas of backends/formulas.py, in double --------------------------------

__device__ __forceinline__ double inverse_std(double var, double eps) { return 1.0 / sqrt(var + eps); }

// The training gradient dx = (dy - mean_dy - (x - mean) * k) * scale from the channel sums of dy and
// dy * (x - mean) over `count` elements.
struct BackwardCoefficients {
    double mean_dy, k, scale;
};

__device__ __forceinline__ BackwardCoefficients backward_coefficients(double sum_dy, double sum_dy_xmu, double invstd,
                                                                      double weight, double count) {
    return {sum_dy / count, sum_dy_xmu * invstd * invstd / count, weight * invstd};
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

}  // namespace abn
