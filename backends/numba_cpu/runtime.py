"""How the Numba kernels are compiled and run: the compile options, the threading layer, thread
counts, the serial twins of the parallel kernels, what happens in a forked child, and the notice
printed while compiling.

Threads and processes. The kernels are nogil, so Python threads call them at once, and users fork
worker processes after using them. Of Numba's threading layers only TBB is safe for both: GNU
OpenMP terminates a child forked after the parent ran a parallel region, and the workqueue layer
aborts on concurrent use (and a forked child inherits none of its threads). So TBB is pinned
whenever it can be loaded and the user has not chosen a layer. The ``tbb`` wheel (a dependency where
wheels exist) installs its library in ``<prefix>/lib``, where the dynamic loader does not look, so it
is loaded from there by path before Numba asks for it. Where no TBB can be had, a child forked
after the parent launched Numba's threads runs the serial twins of the kernels (same bits, one
core) instead of hanging or being terminated, and under the workqueue layer calls are serialized.
"""

import contextlib
import ctypes
import functools
import importlib.metadata
import os
import sys
import threading
from types import FunctionType

import numba
from numba import njit
from numba.core import event

# On-disk cache: compiling a kernel costs seconds, loading it tens of milliseconds. Numba's cache
# is safe for processes compiling into one directory at once (tests/test_threads.py): each index
# and object file is written to a temporary name and renamed into place.
OPTIONS = dict(error_model="numpy", cache=True, nogil=True)
# Reductions let LLVM reassociate, which vectorizes a sum in an order fixed at compile time.
REDUCTION = dict(OPTIONS, fastmath={"reassoc"})
# Helpers that only kernels call go without the wrappers that let Python and C call a function:
# Numba would compile both for every helper, a share of a cold first call (benchmarks/RESULTS.md).
NESTED = dict(OPTIONS, no_cpython_wrapper=True, no_cfunc_wrapper=True)
NESTED_REDUCTION = dict(REDUCTION, no_cpython_wrapper=True, no_cfunc_wrapper=True)

# Inputs of at most this many elements run the serial twins of the parallel kernels: waking the
# threads costs tens of microseconds, more than such an input's whole pass.
SERIAL_MAX_ELEMENTS = 1 << 15

# --- the threading layer --------------------------------------------------------------------------

_TBB_LIBRARIES = ("libtbb.so.12", "tbb12.dll")


def _tbb_wheel_library():
    """The path of the TBB library that the ``tbb`` distribution installed, or None."""
    try:
        files = importlib.metadata.files("tbb") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name in _TBB_LIBRARIES:
            path = file.locate()
            if os.path.exists(path):
                return os.path.realpath(path)
    return None


def _load_tbb():
    """Load Numba's TBB pool, preferring the ``tbb`` wheel's library; None, or why it failed."""
    library = _tbb_wheel_library()
    if library is not None:
        try:  # once loaded under its soname, the loader hands this copy to Numba's extension
            ctypes.CDLL(library, mode=ctypes.RTLD_GLOBAL)
        except OSError as e:
            return f"the tbb wheel's {library} did not load ({e})"
    try:
        from numba.np.ufunc import tbbpool  # noqa: F401  (loads libtbb or fails)
    except ImportError as e:
        hint = "" if library is not None else "; `pip install tbb` provides it"
        return f"Numba's TBB layer did not load ({e}){hint}"
    return None


def _pin_threading_layer():
    """Pin TBB unless the user chose a layer, loading the wheel's TBB for any choice that may use it.
    Returns why TBB will not be the layer, or None."""
    chosen = numba.config.THREADING_LAYER
    if chosen not in ("default", "tbb", "safe", "threadsafe"):
        return f"NUMBA_THREADING_LAYER={chosen} chosen by the environment"
    failure = _load_tbb()
    if failure is None and chosen == "default":
        numba.config.THREADING_LAYER = "tbb"
    return failure


NOT_TBB_REASON = _pin_threading_layer()


def threading_layer():
    """Numba's threading layer for accelbn's kernels, launching Numba's threads if need be."""
    numba.get_num_threads()  # launches the threads, which picks the layer
    return numba.threading_layer()


# --- forked children ------------------------------------------------------------------------------

_serial_only = False  # set in a child forked after its parent launched a layer that is not fork-safe


def _after_fork_in_child():
    global _serial_only
    try:
        layer = numba.threading_layer()
    except ValueError:  # the parent never launched Numba's threads: the child launches its own
        return
    if layer != "tbb":
        _serial_only = True


if hasattr(os, "register_at_fork"):  # POSIX; elsewhere there is no fork
    os.register_at_fork(after_in_child=_after_fork_in_child)


def serial_only():
    """Whether this process may run only the serial kernels (a child forked from a parent that ran
    Numba's threads under a layer that is not fork-safe)."""
    return _serial_only


# --- thread counts and serialization ---------------------------------------------------------------


def _threads_from_environment():
    value = os.environ.get("ACCELBN_NUM_THREADS", "").strip()
    if not value:
        return None
    limit = numba.config.NUMBA_NUM_THREADS
    if not value.isdigit() or not 1 <= int(value) <= limit:
        raise ValueError(f"ACCELBN_NUM_THREADS must be an integer from 1 to {limit} (NUMBA_NUM_THREADS), got {value!r}")
    return int(value)


_NUM_THREADS = _threads_from_environment()
_ONE_AT_A_TIME = threading.Lock()


def _thread_safe_layer():
    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet: what Numba will pick
        layer = numba.config.THREADING_LAYER
    return layer in ("tbb", "omp", "safe", "threadsafe")


def runs_serial(x):
    """Whether work on ``x`` (the first array of an entry point) runs the serial kernels: small
    inputs always, everything in a child that must not launch threads. Decided by the size, so the
    thread count and the path never change a result."""
    return x.size <= SERIAL_MAX_ELEMENTS or _serial_only


def entry(function):
    """An entry point ``function(kernels, x, ...)``, called as ``function(x, ...)``: serial or parallel
    is decided once, from x (:func:`runs_serial`), and handed to it as the :class:`Kernels` to run.
    Parallel kernels run on ACCELBN_NUM_THREADS threads when it is set (else on Numba's count for the
    calling thread), one call at a time under a layer that is not thread-safe."""

    def serialized(kernels, args):
        with contextlib.nullcontext() if _thread_safe_layer() else _ONE_AT_A_TIME:
            return function(kernels, *args)

    @functools.wraps(function)
    def call(*args):
        _call.announced = not announce_compiles  # at most one compile notice per call
        kernels = choose(args[0])
        if kernels.serial:
            return function(kernels, *args)
        if _NUM_THREADS is None:
            return serialized(kernels, args)
        previous = numba.get_num_threads()
        numba.set_num_threads(_NUM_THREADS)
        try:
            return serialized(kernels, args)
        finally:
            numba.set_num_threads(previous)

    return call


# --- parallel kernels and their serial twins ------------------------------------------------------


class Kernels:
    """Every kernel as an attribute named after it, in one of its twins: serial or parallel."""

    def __init__(self, serial):
        self.serial = serial

    def tasks(self, per_thread):
        """How many tasks to split work into: ``per_thread`` per thread of Numba's count for the
        calling thread, to balance the threads; one for the serial twins, whose every further task
        would cost its own parameter tables."""
        return 1 if self.serial else per_thread * numba.get_num_threads()


PARALLEL = Kernels(serial=False)
SERIAL = Kernels(serial=True)
_KERNELS = set()  # the dispatchers of both twins, whose compiles announce themselves


def kernel(function):
    """Compile a prange kernel twice: parallel (returned), and serial (prange runs as range), as the
    attributes of PARALLEL and SERIAL named after it. Both do the same arithmetic in the same order,
    so they give the same bits. The serial one is compiled from a renamed copy, so each has its own
    disk cache. Nothing compiles until a kernel is first called with a new dtype and layout."""
    name = function.__name__.lstrip("_")
    if hasattr(PARALLEL, name):  # one namespace serves every operation: a name may not be reused
        raise ValueError(f"a kernel named {name!r} is registered already")
    twin = FunctionType(function.__code__, function.__globals__, f"{function.__name__}_serial")
    twin.__qualname__ = twin.__name__
    setattr(SERIAL, name, njit(**OPTIONS)(twin))
    setattr(PARALLEL, name, njit(parallel=True, **OPTIONS)(function))
    _KERNELS.update((getattr(SERIAL, name), getattr(PARALLEL, name)))
    return getattr(PARALLEL, name)


def choose(x):
    """The kernels for work on ``x``: serial or parallel, as :func:`runs_serial` says."""
    return SERIAL if runs_serial(x) else PARALLEL


# --- the compile notice ----------------------------------------------------------------------------
# Compiling a kernel for a new dtype takes seconds and happens once per machine (the result is
# cached on disk), so an entry point that is about to compile one says so on stderr, once per call.

_call = threading.local()
announce_compiles = True  # off while `python -m accelbn compile` reports for itself


class _CompileListener(event.Listener):
    def on_start(self, ev):
        if getattr(_call, "announced", False) or ev.data["dispatcher"] not in _KERNELS:
            return
        _call.announced = True
        print(
            f"accelbn: compiling CPU kernels for {ev.data['args'][0].dtype}, first use only "
            "(`python -m accelbn compile` does it ahead of time)",
            file=sys.stderr,
            flush=True,
        )

    def on_end(self, ev):
        pass


event.register("numba:compile", _CompileListener())
