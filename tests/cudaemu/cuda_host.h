// cuda_host.h: runs CUDA C++ kernels on the CPU, for tests. build.py compiles it with g++ ahead of
// the unmodified kernel source.
//
// Every CUDA thread of a block is a fiber (ucontext) that switches only at __syncthreads and warp
// shuffles, so a block's threads interleave at exactly the points where CUDA lets them observe each
// other. At each such point the scheduler checks CUDA's rules: every thread of the block waits at
// the same __syncthreads; every lane named in a shuffle's mask reaches that shuffle, with the same
// mask. Blocks run one after another on the calling OS thread. The schedule (the order in which
// fibers and blocks run) is forward, reverse, seeded random, or one warp running as far as it can
// ahead of the others, so code that relies on an order CUDA does not promise gives results that
// change with the schedule.
//
// Shared memory, static and dynamic, is filled with 0xFF bytes (NaN, -1) before every block; the
// dynamic array is exactly as large as the launch asked and ends at an inaccessible page. A fault
// (SIGSEGV, SIGBUS, SIGFPE, or SIGILL from a -fsanitize-trap check) inside a launch ends the launch
// with an error naming the block and thread; the Python side adds the source line.
#pragma once

#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <dlfcn.h>
#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <csetjmp>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

// --- qualifiers: host code, nothing more -----------------------------------------------------------
#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __host__
#define __host__
#undef __forceinline__
#define __forceinline__ inline
#undef __noinline__
#define __noinline__
#undef __launch_bounds__
#define __launch_bounds__(...)
// build.py rewrites every __shared__ declaration; one it missed fails to compile.
#undef __shared__
#define __shared__ __shared__not_rewritten_by_cudaemu_build

namespace cudaemu {

enum State { RUNNABLE, AT_BARRIER, AT_SHUFFLE, DONE };
enum ShuffleKind { SHFL_IDX, SHFL_UP, SHFL_DOWN, SHFL_XOR };
enum Schedule { FORWARD, REVERSE, RANDOM, WARP_AHEAD_HIGH, WARP_AHEAD_LOW };

constexpr unsigned WARP = 32;
constexpr std::size_t SHARED_LIMIT = 48 * 1024;  // per block, without an opt-in attribute
constexpr std::size_t STACK_BYTES = 128 * 1024;

struct Fiber {
    ucontext_t context;
    uint3 tid;
    unsigned linear = 0;
    State state = RUNNABLE;
    const char* file = nullptr;  // the sync point it waits at
    int line = 0;
    // the shuffle it waits at
    unsigned mask = 0;
    int kind = 0, arg = 0, width = 32;
    std::size_t size = 0;
    unsigned char value[8] = {}, result[8] = {};
};

// One guarded region: `bytes` usable bytes ending at an inaccessible page.
struct GuardedRegion {
    char* map = nullptr;
    std::size_t map_bytes = 0;
    unsigned char* data = nullptr;

    bool allocate(std::size_t bytes) {
        const std::size_t page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
        const std::size_t rounded = (bytes + 15) / 16 * 16;
        map_bytes = (rounded + page - 1) / page * page + 2 * page;
        void* m = mmap(nullptr, map_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED) return false;
        map = static_cast<char*>(m);
        mprotect(map, page, PROT_NONE);
        mprotect(map + map_bytes - page, page, PROT_NONE);
        data = reinterpret_cast<unsigned char*>(map + map_bytes - page - rounded);
        return true;
    }
    ~GuardedRegion() {
        if (map) munmap(map, map_bytes);
    }
};

struct Launch {
    void (*invoke)(void* fn, void** args) = nullptr;
    void* fn = nullptr;
    void** args = nullptr;
    Schedule schedule = FORWARD;
    std::mt19937 rng;
    ucontext_t scheduler;
    std::vector<Fiber> fibers;
    std::string error;
    // static __shared__ variables: (key, offset) for this block, bump-allocated in static_region
    std::vector<std::pair<const void*, std::size_t>> statics;
    std::size_t static_used = 0, dynamic_bytes = 0;
    GuardedRegion static_region, dynamic_region;
};

inline thread_local Fiber* t_current = nullptr;
inline thread_local Launch* t_launch = nullptr;
inline thread_local uint3 t_block_idx{0, 0, 0};
inline thread_local dim3 t_block_dim{1, 1, 1};
inline thread_local dim3 t_grid_dim{1, 1, 1};

struct KernelError {
    std::string message;
};

inline std::string block_name() {
    return "block (" + std::to_string(t_block_idx.x) + "," + std::to_string(t_block_idx.y) + "," +
           std::to_string(t_block_idx.z) + ")";
}

inline std::string where(const Fiber& f) {
    char buf[200];
    const char* what = f.state == AT_BARRIER ? "waits at __syncthreads" : f.state == AT_SHUFFLE ? "waits at a shuffle"
                       : f.state == DONE     ? "has returned"
                                             : "runs";
    if (f.file)
        std::snprintf(buf, sizeof buf, "thread (%u,%u,%u) %s (%s:%d)", f.tid.x, f.tid.y, f.tid.z, what, f.file, f.line);
    else
        std::snprintf(buf, sizeof buf, "thread (%u,%u,%u) %s", f.tid.x, f.tid.y, f.tid.z, what);
    return buf;
}

// Ends the launch from inside a fiber: the scheduler stops at the first error and never resumes it.
[[noreturn]] inline void fail_in_fiber(const char* file, int line, const std::string& message) {
    Launch* l = t_launch;
    if (l->error.empty())
        l->error = std::string(file) + ":" + std::to_string(line) + ": " + block_name() + " " + where(*t_current) +
                   ": " + message;
    swapcontext(&t_current->context, &l->scheduler);
    __builtin_unreachable();
}

inline void fiber_entry() {
    Launch* l = t_launch;
    l->invoke(l->fn, l->args);
    t_current->state = DONE;
    t_current->file = nullptr;
    // uc_link returns to the scheduler
}

inline void syncthreads(const char* file, int line) {
    Fiber* f = t_current;
    f->state = AT_BARRIER;
    f->file = file;
    f->line = line;
    swapcontext(&f->context, &t_launch->scheduler);
}

// --- shared memory ------------------------------------------------------------------------------------

inline void shared_limit_check(const char* file, int line) {
    Launch* l = t_launch;
    if (l->static_used + l->dynamic_bytes > SHARED_LIMIT)
        fail_in_fiber(file, line, "the block needs " + std::to_string(l->static_used) + " bytes of static and " +
                                      std::to_string(l->dynamic_bytes) + " of dynamic shared memory, more than " +
                                      std::to_string(SHARED_LIMIT) + " without an opt-in");
}

// A static __shared__ variable of type T (an array type too): one object per block, shared by its
// threads, poisoned before the block starts. `key` is unique per declaration and instantiation.
template <typename T> T& static_shared(const void* key, const char* file, int line) {
    Launch* l = t_launch;
    for (const auto& [k, offset] : l->statics)
        if (k == key) return *reinterpret_cast<T*>(l->static_region.data + offset);
    const std::size_t offset = (l->static_used + alignof(T) - 1) / alignof(T) * alignof(T);
    l->static_used = offset + sizeof(T);
    shared_limit_check(file, line);
    l->statics.emplace_back(key, offset);
    return *reinterpret_cast<T*>(l->static_region.data + offset);
}

inline unsigned char* dynamic_shared() { return t_launch->dynamic_region.data; }

// --- warp shuffles ------------------------------------------------------------------------------------

template <typename T>
inline T shuffle(int kind, unsigned mask, T var, int arg, int width, const char* file, int line) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "unsupported shuffle type");
    Fiber* f = t_current;
    const unsigned lane = f->linear % WARP, warp_first = f->linear / WARP * WARP;
    const unsigned threads = t_block_dim.x * t_block_dim.y * t_block_dim.z;
    const unsigned lanes_here = std::min(WARP, threads - warp_first);
    if (!(mask >> lane & 1u)) fail_in_fiber(file, line, "a shuffle's mask must name the calling lane");
    if (lanes_here < WARP && (mask >> lanes_here) != 0)
        fail_in_fiber(file, line, "the shuffle's mask names lanes beyond the block's last warp (" +
                                      std::to_string(lanes_here) + " lanes)");
    if (width <= 0 || width > 32 || (width & (width - 1))) fail_in_fiber(file, line, "shuffle width must be a power of 2 <= 32");
    f->state = AT_SHUFFLE;
    f->file = file;
    f->line = line;
    f->mask = mask;
    f->kind = kind;
    f->arg = arg;
    f->width = width;
    f->size = sizeof(T);
    std::memcpy(f->value, &var, sizeof(T));
    swapcontext(&f->context, &t_launch->scheduler);
    T out;
    std::memcpy(&out, f->result, sizeof(T));
    return out;
}

// Completes the shuffles whose named lanes have all arrived at the same one. Returns whether any
// lane was released; sets `problem` when a rule is broken.
inline bool release_shuffles(Launch& l, std::string& problem) {
    bool released = false;
    const unsigned n = static_cast<unsigned>(l.fibers.size());
    for (unsigned first = 0; first < n; first += WARP) {
        const unsigned last = std::min(n, first + WARP);
        for (unsigned i = first; i < last; ++i) {
            Fiber& leader = l.fibers[i];
            if (leader.state != AT_SHUFFLE) continue;
            bool ready = true;
            for (unsigned j = first; j < last; ++j) {
                if (!(leader.mask >> (j - first) & 1u)) continue;
                const Fiber& f = l.fibers[j];
                if (f.state == AT_SHUFFLE) {
                    if (f.line != leader.line || f.file != leader.file || f.mask != leader.mask ||
                        f.kind != leader.kind || f.width != leader.width || f.size != leader.size) {
                        problem = "lanes named in one shuffle's mask are at different shuffles (or masks): " +
                                  where(leader) + " with mask " + std::to_string(leader.mask) + "; " + where(f) +
                                  " with mask " + std::to_string(f.mask);
                        return false;
                    }
                } else {
                    ready = false;
                    if (f.state != RUNNABLE) {
                        problem = "a lane named in a shuffle's mask does not reach it: " + where(leader) + "; " + where(f);
                        return false;
                    }
                }
            }
            if (!ready) continue;
            for (unsigned j = first; j < last; ++j) {
                Fiber& f = l.fibers[j];
                if (!(leader.mask >> (j - first) & 1u)) continue;
                const int lane = static_cast<int>(j - first), width = f.width, base = lane / width * width;
                int src = lane;
                switch (f.kind) {
                    case SHFL_IDX: src = base + (f.arg % width + width) % width; break;
                    case SHFL_UP: src = lane - f.arg >= base ? lane - f.arg : lane; break;
                    case SHFL_DOWN: src = lane + f.arg < base + width ? lane + f.arg : lane; break;
                    case SHFL_XOR: src = (lane ^ f.arg) < base + width ? (lane ^ f.arg) : lane; break;
                }
                // Reading a lane outside the mask is undefined on the GPU: poison.
                if (src >= 0 && src < static_cast<int>(WARP) && (leader.mask >> src & 1u))
                    std::memcpy(f.result, l.fibers[first + static_cast<unsigned>(src)].value, f.size);
                else
                    std::memset(f.result, 0xFF, f.size);
            }
            for (unsigned j = first; j < last; ++j)
                if (leader.mask >> (j - first) & 1u) {
                    l.fibers[j].state = RUNNABLE;
                }
            released = true;
        }
    }
    return released;
}

// --- the scheduler ------------------------------------------------------------------------------------

struct StackPool {
    std::vector<char*> stacks;
    char* get(std::size_t i) {
        while (stacks.size() <= i) {
            const std::size_t page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
            void* s = mmap(nullptr, STACK_BYTES + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (s == MAP_FAILED) return nullptr;
            mprotect(s, page, PROT_NONE);  // overflow faults instead of corrupting a neighbour
            stacks.push_back(static_cast<char*>(s) + page);
        }
        return stacks[i];
    }
};
inline thread_local StackPool t_stacks;

[[noreturn]] inline void block_error(const std::string& message) { throw KernelError{block_name() + ": " + message}; }

inline void run_block(Launch& l) {
    const unsigned n = static_cast<unsigned>(l.fibers.size());
    for (unsigned i = 0; i < n; ++i) {
        Fiber& f = l.fibers[i];
        f.state = RUNNABLE;
        f.file = nullptr;
        f.line = 0;
        getcontext(&f.context);
        f.context.uc_stack.ss_sp = t_stacks.get(i);
        f.context.uc_stack.ss_size = STACK_BYTES;
        f.context.uc_link = &l.scheduler;
        makecontext(&f.context, fiber_entry, 0);
    }
    std::vector<unsigned> order(n);
    for (unsigned i = 0; i < n; ++i) order[i] = i;
    if (l.schedule == REVERSE || l.schedule == WARP_AHEAD_HIGH) std::reverse(order.begin(), order.end());
    for (;;) {
        if (l.schedule == RANDOM) std::shuffle(order.begin(), order.end(), l.rng);
        // Warp-ahead schedules run one warp (highest or lowest first) as far as it can go, shuffles
        // included, before any other warp moves.
        int only_warp = -1;
        if (l.schedule == WARP_AHEAD_HIGH || l.schedule == WARP_AHEAD_LOW)
            for (unsigned i : order)
                if (l.fibers[i].state == RUNNABLE) {
                    only_warp = static_cast<int>(i / WARP);
                    break;
                }
        for (unsigned i : order) {
            Fiber& f = l.fibers[i];
            if (f.state != RUNNABLE || (only_warp >= 0 && static_cast<int>(i / WARP) != only_warp)) continue;
            t_current = &f;
            swapcontext(&l.scheduler, &f.context);
            t_current = nullptr;
            if (!l.error.empty()) throw KernelError{l.error};
        }
        std::string problem;
        const bool released = release_shuffles(l, problem);
        if (!problem.empty()) block_error(problem);
        if (released) continue;
        bool runnable = false;
        for (const Fiber& f : l.fibers) runnable |= f.state == RUNNABLE;
        if (runnable) continue;  // a warp-ahead schedule left other warps for later
        // Every thread is at a barrier, at a shuffle that cannot complete, or done.
        const Fiber* barrier = nullptr;
        unsigned done = 0, at_barrier = 0;
        for (const Fiber& f : l.fibers) {
            done += f.state == DONE;
            if (f.state == AT_BARRIER) {
                ++at_barrier;
                if (!barrier) barrier = &f;
            }
        }
        if (done == n) return;
        if (at_barrier == n) {
            for (const Fiber& f : l.fibers)
                if (f.line != barrier->line || f.file != barrier->file)
                    block_error("threads of one block wait at different __syncthreads: " + where(*barrier) + "; " + where(f));
            for (Fiber& f : l.fibers) f.state = RUNNABLE;
            continue;
        }
        const Fiber* waiting = barrier;
        const Fiber* other = nullptr;
        for (const Fiber& f : l.fibers)
            if (!waiting && f.state != DONE) waiting = &f;
        for (const Fiber& f : l.fibers)
            if (f.state != waiting->state || f.line != waiting->line) {
                other = &f;
                break;
            }
        block_error("deadlock: " + where(*waiting) + (other ? "; " + where(*other) : std::string()) +
                    (barrier && done ? " (a __syncthreads that some threads of the block never reach)" : ""));
    }
}

// --- faults -------------------------------------------------------------------------------------------

inline thread_local sigjmp_buf* t_fault_jump = nullptr;
inline thread_local int t_fault_signal = 0;
inline thread_local void* t_fault_address = nullptr;
inline thread_local void* t_fault_pc = nullptr;

inline void on_fault(int sig, siginfo_t* info, void* context) {
    if (!t_fault_jump) {  // not inside a launch: let it crash as it would have
        signal(sig, SIG_DFL);
        raise(sig);
        return;
    }
    t_fault_signal = sig;
    t_fault_address = info->si_addr;
#if defined(__x86_64__)
    t_fault_pc = reinterpret_cast<void*>(static_cast<ucontext_t*>(context)->uc_mcontext.gregs[REG_RIP]);
#elif defined(__aarch64__)
    t_fault_pc = reinterpret_cast<void*>(static_cast<ucontext_t*>(context)->uc_mcontext.pc);
#endif
    siglongjmp(*t_fault_jump, 1);
}

inline std::string fault_message() {
    const char* what = t_fault_signal == SIGSEGV ? "invalid memory access"
                       : t_fault_signal == SIGBUS ? "misaligned or invalid memory access"
                       : t_fault_signal == SIGFPE ? "arithmetic fault (integer division by zero?)"
                                                  : "undefined behaviour caught by -fsanitize-trap";
    char buf[400];
    const Fiber* f = t_current;
    Dl_info info{};
    const bool found = t_fault_pc && dladdr(t_fault_pc, &info) && info.dli_fbase;
    const unsigned long long offset =
        found ? static_cast<unsigned long long>(static_cast<char*>(t_fault_pc) - static_cast<char*>(info.dli_fbase)) : 0;
    std::snprintf(buf, sizeof buf, "%s at address %p in %s thread (%u,%u,%u) [pc-offset 0x%llx]", what,
                  t_fault_address, block_name().c_str(), f ? f->tid.x : 0u, f ? f->tid.y : 0u, f ? f->tid.z : 0u,
                  offset);
    return buf;
}

// --- a launch -----------------------------------------------------------------------------------------

// Runs a whole grid. Returns an empty string, or what went wrong.
inline std::string launch(void (*invoke)(void*, void**), void* fn, void** args, dim3 grid, dim3 block,
                          std::size_t shared_bytes, int schedule, unsigned seed) {
    const unsigned long long threads = 1ull * block.x * block.y * block.z;
    if (threads == 0 || threads > 1024 || block.x > 1024 || block.y > 1024 || block.z > 64)
        return "invalid block dimensions (at most 1024 threads; z at most 64)";
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535)
        return "invalid grid dimensions (x at most 2**31 - 1, y and z at most 65535)";
    if (shared_bytes > SHARED_LIMIT)
        return "a launch asks for " + std::to_string(shared_bytes) + " bytes of dynamic shared memory, more than " +
               std::to_string(SHARED_LIMIT) + " without an opt-in";
    Launch l;
    l.invoke = invoke;
    l.fn = fn;
    l.args = args;
    l.schedule = static_cast<Schedule>(schedule);
    l.rng.seed(seed);
    l.fibers.resize(threads);
    l.dynamic_bytes = shared_bytes;
    if (!l.static_region.allocate(SHARED_LIMIT) || !l.dynamic_region.allocate(shared_bytes))
        return "cannot map shared memory";
    for (unsigned long long i = 0; i < threads; ++i) {
        if (!t_stacks.get(static_cast<std::size_t>(i))) return "cannot map fiber stacks";
        Fiber& f = l.fibers[i];
        f.linear = static_cast<unsigned>(i);
        f.tid = uint3{static_cast<unsigned>(i % block.x), static_cast<unsigned>(i / block.x % block.y),
                      static_cast<unsigned>(i / (1ull * block.x * block.y))};
    }
    std::vector<unsigned long long> blocks(1ull * grid.x * grid.y * grid.z);
    for (unsigned long long i = 0; i < blocks.size(); ++i) blocks[i] = i;
    if (l.schedule == REVERSE || l.schedule == WARP_AHEAD_HIGH) std::reverse(blocks.begin(), blocks.end());
    if (l.schedule == RANDOM) std::shuffle(blocks.begin(), blocks.end(), l.rng);

    Launch* saved_launch = t_launch;
    t_launch = &l;
    t_block_dim = block;
    t_grid_dim = grid;
    std::string error;
    // Handlers run on their own stack: a fiber whose stack overflowed has none left.
    static thread_local std::vector<char> alt_stack(64 * 1024);
    stack_t alt{}, old_alt{};
    alt.ss_sp = alt_stack.data();
    alt.ss_size = alt_stack.size();
    sigaltstack(&alt, &old_alt);
    struct sigaction action {};
    action.sa_sigaction = on_fault;
    action.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK;
    const int signals[] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL};
    struct sigaction old[4];
    for (int i = 0; i < 4; ++i) sigaction(signals[i], &action, &old[i]);
    sigjmp_buf jump;
    t_fault_jump = &jump;
    if (sigsetjmp(jump, 1) != 0) {
        error = fault_message();
    } else {
        try {
            for (unsigned long long b : blocks) {
                t_block_idx = uint3{static_cast<unsigned>(b % grid.x), static_cast<unsigned>(b / grid.x % grid.y),
                                    static_cast<unsigned>(b / (1ull * grid.x * grid.y))};
                std::memset(l.static_region.data, 0xFF, SHARED_LIMIT);
                std::memset(l.dynamic_region.data, 0xFF, shared_bytes);
                l.statics.clear();
                l.static_used = 0;
                run_block(l);
            }
        } catch (const KernelError& e) {
            error = e.message;
        }
    }
    t_fault_jump = nullptr;
    t_current = nullptr;
    for (int i = 0; i < 4; ++i) sigaction(signals[i], &old[i], nullptr);
    sigaltstack(&old_alt, nullptr);
    t_launch = saved_launch;
    return error;
}

// --- kernel parameters, described so that the caller's arguments can be checked ------------------------
enum Kind { K_OTHER = 0, K_BOOL, K_I8, K_U8, K_I16, K_U16, K_I32, K_U32, K_I64, K_U64, K_F16, K_BF16, K_F32, K_F64 };

template <typename T> constexpr int kind_of() {
    using U = std::remove_cv_t<T>;
    if constexpr (std::is_same_v<U, bool>) return K_BOOL;
    else if constexpr (std::is_same_v<U, __half>) return K_F16;
    else if constexpr (std::is_same_v<U, __nv_bfloat16>) return K_BF16;
    else if constexpr (std::is_same_v<U, float>) return K_F32;
    else if constexpr (std::is_same_v<U, double>) return K_F64;
    else if constexpr (std::is_integral_v<U>) {
        constexpr bool s = std::is_signed_v<U>;
        switch (sizeof(U)) {
            case 1: return s ? K_I8 : K_U8;
            case 2: return s ? K_I16 : K_U16;
            case 4: return s ? K_I32 : K_U32;
            default: return s ? K_I64 : K_U64;
        }
    } else return K_OTHER;
}

struct Param {
    int is_pointer, kind, size, is_const;
};

template <typename P> constexpr Param describe() {
    if constexpr (std::is_pointer_v<P>) {
        using E = std::remove_pointer_t<P>;
        return Param{1, kind_of<E>(), static_cast<int>(sizeof(void*)), std::is_const_v<E> ? 1 : 0};
    } else {
        return Param{0, kind_of<P>(), static_cast<int>(sizeof(P)), 0};
    }
}

template <typename... P, std::size_t... I> void invoke_impl(void (*f)(P...), void** args, std::index_sequence<I...>) {
    f(*static_cast<std::remove_reference_t<P>*>(args[I])...);
}

template <typename... P> void invoke(void* fn, void** args) {
    invoke_impl(reinterpret_cast<void (*)(P...)>(fn), args, std::index_sequence_for<P...>{});
}

struct Entry {
    const char* name;
    void* fn;
    void (*invoke)(void*, void**);
    int nparams;
    const Param* params;
};

template <typename... P> struct Signature {
    static constexpr Param params[sizeof...(P) + 1] = {describe<P>()..., Param{0, 0, 0, 0}};
};

template <typename... P> Entry make_entry(const char* name, void (*f)(P...)) {
    return Entry{name, reinterpret_cast<void*>(f), &invoke<P...>, static_cast<int>(sizeof...(P)), Signature<P...>::params};
}

// The types CUDA's __shfl_*_sync accept.
template <typename T>
constexpr bool shuffle_type = std::is_same_v<T, int> || std::is_same_v<T, unsigned int> || std::is_same_v<T, long> ||
                              std::is_same_v<T, unsigned long> || std::is_same_v<T, long long> ||
                              std::is_same_v<T, unsigned long long> || std::is_same_v<T, float> ||
                              std::is_same_v<T, double> || std::is_same_v<T, __half> || std::is_same_v<T, __half2> ||
                              std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __nv_bfloat162>;

template <typename T>
inline T shfl_at(int kind, const char* file, int line, unsigned mask, T var, int arg, int width = WARP) {
    static_assert(shuffle_type<T>, "no __shfl_*_sync overload for this type in CUDA");
    return shuffle(kind, mask, var, arg, width, file, line);
}

}  // namespace cudaemu

// --- built-in variables and intrinsics ------------------------------------------------------------------
#define threadIdx (static_cast<const uint3&>(::cudaemu::t_current->tid))
#define blockIdx (static_cast<const uint3&>(::cudaemu::t_block_idx))
#define blockDim (static_cast<const dim3&>(::cudaemu::t_block_dim))
#define gridDim (static_cast<const dim3&>(::cudaemu::t_grid_dim))
#define warpSize 32

#define __syncthreads() ::cudaemu::syncthreads(__FILE__, __LINE__)
#define __shfl_sync(...) ::cudaemu::shfl_at(::cudaemu::SHFL_IDX, __FILE__, __LINE__, __VA_ARGS__)
#define __shfl_up_sync(...) ::cudaemu::shfl_at(::cudaemu::SHFL_UP, __FILE__, __LINE__, __VA_ARGS__)
#define __shfl_down_sync(...) ::cudaemu::shfl_at(::cudaemu::SHFL_DOWN, __FILE__, __LINE__, __VA_ARGS__)
#define __shfl_xor_sync(...) ::cudaemu::shfl_at(::cudaemu::SHFL_XOR, __FILE__, __LINE__, __VA_ARGS__)

// Device functions CUDA declares for integer types too.
template <typename T, typename U> inline auto min(T a, U b) -> std::common_type_t<T, U> { return b < a ? b : a; }
template <typename T, typename U> inline auto max(T a, U b) -> std::common_type_t<T, U> { return a < b ? b : a; }
using std::fma;
using std::sqrt;
inline float rsqrtf(float v) { return 1.0f / std::sqrt(v); }
inline double rsqrt(double v) { return 1.0 / std::sqrt(v); }
