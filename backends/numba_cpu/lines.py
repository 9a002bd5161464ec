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
without reading them, so a normalize pass moves two arrays' worth of memory instead of three
(benchmarks/RESULTS.md has a copy timed both ways). Numba has no
streaming store; LLVM lowers a full-line vector store marked ``!nontemporal`` to ``vmovntps``/
``vmovntpd`` on x86 and to an ordinary store where a target has none. Streaming stores are weakly
ordered: a task calls :func:`store_fence` before other threads may read what it wrote.

:func:`column_kernel` does the same for column sums of a row-major array: a strip of lines of
columns summed row after row with the sums held in SIMD registers, each column in the order (and
with the bits) of a scalar loop over the rows.
"""

from llvmlite import ir
from numba import njit, types
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

    def relu(self):
        zero = ir.Constant(self.value.type, None)
        negative = self.builder.fcmp_ordered("<", self.value, zero)
        return _Vector(self.builder, self.builder.select(negative, zero, self.value))

    def widen(self):
        """The same values as float64 lanes (exact)."""
        kind = self.value.type
        if isinstance(kind.element, ir.DoubleType):
            return self
        return _Vector(self.builder, self.builder.fpext(self.value, ir.VectorType(ir.DoubleType(), kind.count)))

    def passed(self, gradient):
        zero = ir.Constant(gradient.value.type, None)
        stopped = self.builder.fcmp_ordered("<=", self.value, ir.Constant(self.value.type, None))
        return _Vector(self.builder, self.builder.select(stopped, zero, gradient.value))

    def passed_outside(self, first, last, gradient):
        zero = ir.Constant(gradient.value.type, None)
        builder = self.builder
        stopped = builder.and_(builder.fcmp_ordered(">=", self.value, first.value), builder.fcmp_ordered("<=", self.value, last.value))
        return _Vector(builder, builder.select(stopped, zero, gradient.value))


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


def relu(v):
    """``0 if v < 0 else v``, as torch's ReLU (NaN stays NaN), for formulas: on the vectors of
    :func:`line_kernel`, and on float scalars in Numba code (same bits either way)."""
    if not isinstance(v, _Vector):
        raise TypeError("relu works in Numba code and in line_kernel formulas")
    return v.relu()


@overload(relu, inline="always")
def _relu_overload(v):
    if not isinstance(v, types.Float):
        return None
    kind = v

    def impl(v):
        if v < 0:
            return kind(0)
        return v

    return impl


def passed(v, gradient):
    """``0 if v <= 0 else gradient``: the gradient a ReLU whose input was v lets through (torch's
    ``threshold_backward``; a NaN input passes it), on line vectors and Numba floats alike."""
    if not isinstance(v, _Vector):
        raise TypeError("passed works in Numba code and in line_kernel formulas")
    return v.passed(gradient)


@overload(passed, inline="always")
def _passed_overload(v, gradient):
    if not (isinstance(v, types.Float) and isinstance(gradient, types.Float)):
        return None
    kind = gradient

    def impl(v, gradient):
        if v <= 0:
            return kind(0)
        return gradient

    return impl


def passed_outside(x, first, last, gradient):
    """``0 if first <= x <= last else gradient``: the gradient a ReLU lets through where it stopped
    exactly the x in [first, last] (a NaN x passes; an empty interval, first > last, passes all), on
    line vectors and Numba floats alike. :func:`.elements.relu_stops` gives the interval of
    :func:`passed` applied to batch norm's output, so that a mask costs two comparisons, not the
    output's arithmetic."""
    if not isinstance(x, _Vector):
        raise TypeError("passed_outside works in Numba code and in line_kernel formulas")
    return x.passed_outside(first, last, gradient)


@overload(passed_outside, inline="always")
def _passed_outside_overload(x, first, last, gradient):
    if not (isinstance(x, types.Float) and isinstance(gradient, types.Float)):
        return None
    kind = gradient

    def impl(x, first, last, gradient):
        if x >= first and x <= last:
            return kind(0)
        return gradient

    return impl


class _LineVectors:
    """Cache-line-wide loads for the intrinsics below: ``lanes`` elements from an index of an array
    on, as vectors of ``compute_type`` (widened from a narrower array dtype), or of the array's own
    dtype where ``compute_type`` is None (the formula widens what it needs)."""

    def __init__(self, context, builder, lanes, compute_type):
        self.context = context
        self.builder = builder
        self.lanes = lanes
        self.compute_type = compute_type
        self.compute = None if compute_type is None else ir.VectorType(context.get_data_type(compute_type), lanes)

    def pointer(self, array_type, array_value, indices):
        array = self.context.make_array(array_type)(self.context, self.builder, array_value)
        item = cgutils.get_item_pointer(self.context, self.builder, array_type, array, indices, wraparound=False)
        lanes = ir.VectorType(self.context.get_data_type(array_type.dtype), self.lanes)
        return self.builder.bitcast(item, lanes.as_pointer())

    def load(self, array_type, array_value, indices):
        pointer = self.pointer(array_type, array_value, indices)
        loaded = self.builder.load(pointer, align=array_type.dtype.bitwidth // 8)
        if self.compute_type is not None and array_type.dtype != self.compute_type:
            loaded = self.builder.fpext(loaded, self.compute)
        return _Vector(self.builder, loaded)

    def params(self, params_type, params_value, channel):
        """Each parameter as a vector: a per-channel table read from ``channel`` on, or a scalar in
        every lane."""
        values = []
        for k, kind in enumerate(params_type):
            value = self.builder.extract_value(params_value, k)
            if isinstance(kind, types.Array):
                values.append(self.load(kind, value, [channel]))
            else:
                target = kind if self.compute_type is None else self.compute_type
                values.append(self.splat(self.context.cast(self.builder, value, kind, target)))
        return values

    def splat(self, scalar):
        undefined = ir.Constant(ir.VectorType(scalar.type, self.lanes), ir.Undefined)
        first = self.builder.insert_element(undefined, scalar, ir.IntType(32)(0))
        lanes = ir.Constant(ir.VectorType(ir.IntType(32), self.lanes), [0] * self.lanes)
        return _Vector(self.builder, self.builder.shuffle_vector(first, undefined, lanes))


def line_kernel(formula, nontemporal, wide=False, exact=False):
    """An intrinsic ``line(out, j, arrays, params, channel)``: one line ``out[j:j + W]``, where W
    elements fill a cache line, set to ``formula(*(a[j:j + W] for a in arrays), *params)``.

    ``arrays`` is a tuple of unit-stride arrays of ``out``'s dtype. ``params`` is a tuple of scalars
    (broadcast to every element) or of per-channel tables, read at ``table[channel:channel + W]``.
    The formula runs in ``out``'s dtype, or in float64 with ``wide`` (inputs widened, the result
    rounded once), or with ``exact`` on the arrays and tables in their own dtypes (the formula widens
    with ``.widen()``; a float64 result is rounded once). With ``nontemporal`` the store streams and
    ``out[j]`` must be line-aligned.
    """

    @intrinsic
    def line(typingctx, out, j, arrays, params, channel):
        if not (isinstance(out, types.Array) and isinstance(arrays, types.BaseTuple)):
            return None

        def codegen(context, builder, signature, args):
            out_type, _, arrays_type, params_type, _ = signature.args
            element = context.get_data_type(out_type.dtype)
            lanes = LINE_BYTES // context.get_abi_sizeof(element)
            vectors = _LineVectors(context, builder, lanes, None if exact else types.float64 if wide else out_type.dtype)
            inputs = [vectors.load(arrays_type[k], builder.extract_value(args[2], k), [args[1]]) for k in range(len(arrays_type))]
            result = formula(*inputs, *vectors.params(params_type, args[3], args[4])).value
            if result.type != ir.VectorType(element, lanes):
                result = builder.fptrunc(result, ir.VectorType(element, lanes))
            store = builder.store(result, vectors.pointer(out_type, args[0], [args[1]]), align=LINE_BYTES if nontemporal else context.get_abi_sizeof(element))
            if nontemporal:
                store.set_metadata("nontemporal", builder.module.add_metadata([ir.IntType(32)(1)]))
            return context.get_dummy_value()

        return types.void(out, j, arrays, params, channel), codegen

    return line


def column_kernel(formula, lines, lanes=None, exact=False):
    """An intrinsic ``column(runs, arrays, offset, r0, r1, c, params)`` for ``lines`` lines of
    columns: for each j in [c, c + lines * W), adds to ``runs[k][j]`` the k-th term of
    ``formula(*(a[r, offset + j] for a in arrays), *params)`` (one term, or a tuple of them) for the
    rows r = r0, r0 + 1, ..., r1 - 1, in that order. A line is W = ``lanes`` columns, by default as
    many as fill a cache line of the arrays.

    ``arrays`` is a tuple of 2-d arrays of one dtype whose rows have unit stride (the caller vouches for
    it, as for :func:`unit_stride`), ``runs`` a tuple of 1-d arrays of the dtype the sums run in (the
    arrays' own, or float64 for wider sums); ``params`` as in :func:`line_kernel`, read at ``j``; with
    ``exact``, arrays and params reach the formula in their own dtypes, as in :func:`line_kernel`. Each
    element computes exactly what ``run[j] += term`` does in a loop over r; the sums stay in registers
    across the rows instead of going through memory at every row, and the lines' sums are independent
    chains that the core overlaps.
    """

    @intrinsic
    def column(typingctx, runs, arrays, offset, r0, r1, c, params):
        if not (isinstance(runs, types.BaseTuple) and isinstance(arrays, types.BaseTuple) and isinstance(params, types.BaseTuple)):
            return None
        if not all(isinstance(a, types.Array) and a.ndim == 2 and a.layout != "F" for a in arrays):
            return None
        if not (all(isinstance(i, types.Integer) for i in (offset, r0, r1, c)) and len({run.dtype for run in runs}) == 1):
            return None

        def codegen(context, builder, signature, args):
            runs_type, arrays_type, *index_types, params_type = signature.args
            per_line = lanes or LINE_BYTES // context.get_abi_sizeof(context.get_data_type(arrays_type[0].dtype))
            vectors = _LineVectors(context, builder, per_line, None if exact else runs_type[0].dtype)
            column_offset, first, stop, channel = (
                context.cast(builder, value, kind, types.intp) for value, kind in zip(args[2:6], index_types)
            )
            starts = [builder.add(channel, ir.Constant(channel.type, k * per_line)) for k in range(lines)]
            values = [vectors.params(params_type, args[6], start) for start in starts]
            totals = [
                [cgutils.alloca_once_value(builder, vectors.load(kind, builder.extract_value(args[0], k), [start]).value) for k, kind in enumerate(runs_type)]
                for start in starts
            ]
            with cgutils.for_range_slice(builder, first, stop, ir.Constant(first.type, 1)) as (row, _):
                for start, value, line_totals in zip(starts, values, totals):
                    column_index = builder.add(column_offset, start)
                    inputs = [vectors.load(kind, builder.extract_value(args[1], k), [row, column_index]) for k, kind in enumerate(arrays_type)]
                    terms = formula(*inputs, *value)
                    for term, total in zip(terms if isinstance(terms, tuple) else (terms,), line_totals):
                        builder.store((_Vector(builder, builder.load(total)) + term).value, total)
            for start, line_totals in zip(starts, totals):
                for k, (kind, total) in enumerate(zip(runs_type, line_totals)):
                    pointer = vectors.pointer(kind, builder.extract_value(args[0], k), [start])
                    builder.store(builder.load(total), pointer, align=kind.dtype.bitwidth // 8)
            return context.get_dummy_value()

        return types.void(runs, arrays, offset, r0, r1, c, params), codegen

    return column


def column_sweep(formula, lines, exact=False):
    """A Numba function ``sweep(runs, arrays, offset, r0, r1, width, params)``: :func:`column_kernel`
    over the columns [0, width), in strips of ``lines`` cache lines, then single lines, then single
    columns (each of them summed row after row, as every column is)."""
    strip = column_kernel(formula, lines, exact=exact)
    one_line = column_kernel(formula, 1, exact=exact)
    one_column = column_kernel(formula, 1, lanes=1, exact=exact)

    @njit(inline="always", error_model="numpy", nogil=True)
    def sweep(runs, arrays, offset, r0, r1, width, params):
        line = LINE_BYTES // arrays[0].itemsize
        strips_end = width - width % (lines * line)
        lines_end = width - width % line
        for c in range(0, strips_end, lines * line):
            strip(runs, arrays, offset, r0, r1, c, params)
        for c in range(strips_end, lines_end, line):
            one_line(runs, arrays, offset, r0, r1, c, params)
        for c in range(lines_end, width):
            one_column(runs, arrays, offset, r0, r1, c, params)

    return sweep


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
