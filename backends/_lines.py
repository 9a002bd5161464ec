"""Whole-cache-line element kernels for Numba, with optional streaming stores, and
:func:`unit_stride`, which gives a reduction the same compiled loop whatever array it reads.

:func:`line_kernel` turns an element formula such as ``((x - m_hi) - m_lo) * s + b`` into a Numba
intrinsic that computes one cache line of the output with SIMD instructions, from arrays at the
same index and from per-channel parameters. It emits exactly the operations the formula spells, in
its order and in the arrays' dtype, so a line gives the same bits as the formula applied to each
element by ordinary Numba code (no fast-math; a fused multiply-add only where the formula calls
:func:`fma`, which rounds once in both).

Why an intrinsic: an output larger than the caches costs, with ordinary stores, a read of every line
before it is overwritten (read for ownership) and its write. Streaming stores write whole lines
without reading them, so a normalize pass moves two arrays' worth of memory instead of three (here:
a 206 MB float32 copy in 9-12 ms with streaming stores, 15.6 ms with ``np.copyto``). Numba has no
streaming store; LLVM lowers a full-line vector store marked ``!nontemporal`` to ``vmovntps``/
``vmovntpd`` on x86 and to an ordinary store where a target has none. Streaming stores are weakly
ordered: a task calls :func:`store_fence` before other threads may read what it wrote.
"""

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.imputils import impl_ret_borrowed
from numba.extending import intrinsic, overload
from numba.np.arrayobj import populate_array

# Bytes in a cache line, the unit of a streaming store; streamed destinations are aligned to it.
LINE_BYTES = 64


class _Vector:
    """An LLVM vector value that formulas combine with +, - and *, as they combine floats."""

    def __init__(self, builder, value):
        self.builder = builder
        self.value = value

    def _apply(self, op, other):
        return _Vector(self.builder, op(self.value, other.value))

    def __add__(self, other):
        return self._apply(self.builder.fadd, other)

    def __sub__(self, other):
        return self._apply(self.builder.fsub, other)

    def __mul__(self, other):
        return self._apply(self.builder.fmul, other)

    def fma(self, b, c):
        return _Vector(self.builder, _fused_multiply_add(self.builder, self.value, b.value, c.value))


def _fused_multiply_add(builder, a, b, c):
    """LLVM's ``a * b + c`` rounded once, on floats or float vectors (an FMA instruction where the
    target has one, exact software otherwise)."""
    kind = a.type
    element = kind.element if isinstance(kind, ir.VectorType) else kind
    name = f"f{64 if isinstance(element, ir.DoubleType) else 32}"
    if isinstance(kind, ir.VectorType):
        name = f"v{kind.count}{name}"
    function = cgutils.get_or_insert_function(builder.module, ir.FunctionType(kind, [kind] * 3), f"llvm.fma.{name}")
    return builder.call(function, [a, b, c])


def fma(a, b, c):
    """``a * b + c`` with one rounding, for formulas: on the vectors of :func:`line_kernel`, and on
    float scalars in Numba code (same bits either way). Not for plain Python floats."""
    if not isinstance(a, _Vector):
        raise TypeError("fma works in Numba code and in line_kernel formulas")
    return a.fma(b, c)


@intrinsic
def _scalar_fma(typingctx, a, b, c):
    if not (isinstance(a, types.Float) and a == b == c):
        return None

    def codegen(context, builder, signature, args):
        return _fused_multiply_add(builder, *args)

    return a(a, b, c), codegen


@overload(fma, inline="always")
def _fma_overload(a, b, c):
    if isinstance(a, types.Float) and a == b == c:
        return lambda a, b, c: _scalar_fma(a, b, c)
    return None


def line_kernel(formula, nontemporal, wide=False):
    """An intrinsic ``line(out, j, arrays, params, channel)``: one line ``out[j:j + W]``, where W
    elements fill a cache line, set to ``formula(*(a[j:j + W] for a in arrays), *params)``.

    ``arrays`` is a tuple of unit-stride arrays of ``out``'s dtype. ``params`` is a tuple of scalars
    (broadcast to every element) or of per-channel tables, read at ``table[channel:channel + W]``.
    The formula runs in ``out``'s dtype, or in float64 with ``wide`` (inputs widened, the result
    rounded once). With ``nontemporal`` the store streams and ``out[j]`` must be line-aligned.
    """

    @intrinsic
    def line(typingctx, out, j, arrays, params, channel):
        if not (isinstance(out, types.Array) and isinstance(arrays, types.BaseTuple)):
            return None

        def codegen(context, builder, signature, args):
            out_type, _, arrays_type, params_type, _ = signature.args
            element = context.get_data_type(out_type.dtype)
            itemsize = context.get_abi_sizeof(element)
            vector = ir.VectorType(element, LINE_BYTES // itemsize)
            compute_type = types.float64 if wide else out_type.dtype
            compute = ir.VectorType(context.get_data_type(compute_type), vector.count)

            def pointer(array_type, array_value, index):
                array = context.make_array(array_type)(context, builder, array_value)
                item = cgutils.get_item_pointer(context, builder, array_type, array, [index], wraparound=False)
                lanes = ir.VectorType(context.get_data_type(array_type.dtype), vector.count)
                return builder.bitcast(item, lanes.as_pointer())

            def load(array_type, array_value, index):
                loaded = builder.load(pointer(array_type, array_value, index), align=array_type.dtype.bitwidth // 8)
                return _Vector(builder, loaded if array_type.dtype == compute_type else builder.fpext(loaded, compute))

            def param(k):
                value = builder.extract_value(args[3], k)
                kind = params_type[k]
                if isinstance(kind, types.Array):
                    return load(kind, value, args[4])
                scalar = context.cast(builder, value, kind, compute_type)
                lanes = ir.Constant(ir.VectorType(ir.IntType(32), vector.count), [0] * vector.count)
                first = builder.insert_element(ir.Constant(compute, ir.Undefined), scalar, ir.IntType(32)(0))
                return _Vector(builder, builder.shuffle_vector(first, ir.Constant(compute, ir.Undefined), lanes))

            inputs = [load(arrays_type[k], builder.extract_value(args[2], k), args[1]) for k in range(len(arrays_type))]
            result = formula(*inputs, *(param(k) for k in range(len(params_type)))).value
            if compute != vector:
                result = builder.fptrunc(result, vector)
            store = builder.store(result, pointer(out_type, args[0], args[1]), align=LINE_BYTES if nontemporal else itemsize)
            if nontemporal:
                store.set_metadata("nontemporal", builder.module.add_metadata([ir.IntType(32)(1)]))
            return context.get_dummy_value()

        return types.void(out, j, arrays, params, channel), codegen

    return line


@intrinsic
def store_fence(typingctx):
    """Order this thread's streaming stores before anything it does next (a full memory fence)."""

    def codegen(context, builder, signature, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.void(), codegen


@intrinsic
def prefetch(typingctx, a, i):
    """Ask the hardware to bring the cache line holding ``a[i]`` towards L1 (a hint: no fault, no
    effect on results). For reads that jump between short runs, where hardware prefetchers lag."""
    if not (isinstance(a, types.Array) and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        array = context.make_array(a)(context, builder, args[0])
        item = cgutils.get_item_pointer(context, builder, a, array, [args[1]], wraparound=False)
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        function = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), "llvm.prefetch.p0i8"
        )
        builder.call(function, [builder.bitcast(item, i8p), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return types.void(a, i), codegen


@intrinsic
def unit_stride(typingctx, a):
    """A 1-d array whose elements are adjacent, typed as C-contiguous (the caller vouches for it).

    Numba compiles a function once per argument layout, and LLVM vectorizes a reassociating sum
    differently when the stride is known: a row of a C-contiguous array and the same row of a view
    would sum in different orders. Reductions read their rows through this, so one compiled loop
    (and one order) serves every layout.
    """
    if not (isinstance(a, types.Array) and a.ndim == 1):
        return None
    result = a.copy(layout="C")

    def codegen(context, builder, signature, args):
        source = context.make_array(a)(context, builder, args[0])
        view = context.make_array(result)(context, builder)
        populate_array(
            view,
            data=source.data,
            shape=cgutils.unpack_tuple(builder, source.shape),
            strides=[source.itemsize],
            itemsize=source.itemsize,
            meminfo=source.meminfo,
            parent=source.parent,
        )
        return impl_ret_borrowed(context, builder, result, view._getvalue())

    return result(a), codegen
