"""Safe wherever it is called: Python threads, forked and spawned children (with TBB, and where no
TBB can be loaded), thread-count settings, and a compile cache shared by processes. Results must be
bitwise those of a serial call. Nothing here waits on a child process without a bound."""

import concurrent.futures
import multiprocessing
import os
import subprocess
import sys
import textwrap

import numba
import numpy as np
import pytest

import accelbn as abn
from accelbn.backends.numba_cpu import runtime

# Seconds a child process may take before the test fails (a hang becomes a failure, not a stall).
CHILD_TIMEOUT = 300

# Large enough for every kernel family to run in parallel with streaming stores (8 MB outputs), and
# one small enough for the serial kernels.
SHAPES = [(16, 64, 48, 48), (32768, 64), (4, 2, 512, 512), (32, 16, 3, 3)]


def _work(seed):
    """A train forward and its backward on arrays of its own; the results as bytes."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(SHAPES[seed % len(SHAPES)], dtype=np.float32)
    dy = rng.standard_normal(x.shape, dtype=np.float32)
    channels = x.shape[1]
    running_mean, running_var = np.zeros(channels, np.float32), np.ones(channels, np.float32)
    weight = rng.standard_normal(channels).astype(np.float32)
    y, stats = abn.batch_norm(x, running_mean, running_var, weight, None, True, return_stats=True)
    dx, dweight, dbias = abn.batch_norm_backward(dy, x, stats, weight)
    return b"".join(a.tobytes() for a in (y, running_mean, running_var, dx, dweight, dbias))


def _serial(seeds):
    return [_work(s) for s in seeds]


def test_four_threads_at_once_match_serial_calls():
    seeds = list(range(12))
    expected = _serial(seeds)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        assert list(pool.map(_work, seeds)) == expected


def test_tbb_threading_layer_is_pinned():
    # tbb is a dependency on this platform; no other layer is both thread- and fork-safe.
    _work(0)
    assert numba.threading_layer() == "tbb"
    assert runtime.NOT_TBB_REASON is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_tbb_is_the_wheels_copy_whatever_the_loader_finds():
    # The loader does not search <prefix>/lib, where the tbb wheel puts libtbb: a machine with a
    # system TBB would hide a failure to load the wheel's copy. The copy mapped must be the wheel's.
    code = """
        import numpy as np, accelbn as abn
        from accelbn.backends.numba_cpu import runtime
        abn.batch_norm(np.ones((512, 64, 2), np.float32), None, None, training=True)  # parallel kernels
        maps = open("/proc/self/maps").read().split()
        print(runtime._tbb_wheel_library())
        print(sorted({p for p in maps if "libtbb.so" in p}))
    """
    wheel, mapped = _run(code).splitlines()
    assert wheel != "None", "the tbb wheel's library was not found"
    assert mapped == repr([wheel])


def _pool_digests(method, seeds):
    """Digests of _work(seed) for each seed, computed in a pool of ``method`` children."""
    context = multiprocessing.get_context(method)
    with context.Pool(2) as pool:
        try:
            return pool.map_async(_work, seeds, chunksize=1).get(timeout=CHILD_TIMEOUT)
        except multiprocessing.TimeoutError:
            raise AssertionError(f"{method} children gave no result within {CHILD_TIMEOUT} s") from None


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_child_process_after_parent_used_the_kernels(method):
    seeds = [0, 1, 2]
    expected = _serial(seeds)  # the parent has now run every kernel family
    assert _pool_digests(method, seeds) == expected


# A parent that runs every kernel family in parallel, then forks children that run them too. Under
# GNU OpenMP a forked child may not launch threads (Numba terminates it) and under workqueue it has
# none: the children must run the serial kernels and give the parent's bits.
_FORKING_PARENT = """
    import sys
    if {hide_tbb}:
        sys.modules["numba.np.ufunc.tbbpool"] = None  # as on a machine where no TBB loads
    sys.path.insert(0, {tests!r})
    from accelbn.backends.numba_cpu import runtime
    from test_threads import _pool_digests, _serial
    seeds = [0, 1, 2, 3]
    expected = _serial(seeds)  # the parent runs every kernel family, in parallel, before forking
    assert _pool_digests("fork", seeds) == expected
    print(runtime.threading_layer())
    print(runtime.NOT_TBB_REASON)
"""


@pytest.mark.parametrize(
    ("environment", "hide_tbb", "layer", "reason"),
    [
        ({}, True, "omp", "Numba's TBB layer did not load"),
        ({"NUMBA_THREADING_LAYER": "omp"}, False, "omp", "NUMBA_THREADING_LAYER=omp chosen by the environment"),
        ({"NUMBA_THREADING_LAYER": "workqueue"}, False, "workqueue", "NUMBA_THREADING_LAYER=workqueue"),
    ],
    ids=["no-tbb", "omp", "workqueue"],
)
def test_forked_children_without_tbb_run_serially_and_agree(environment, hide_tbb, layer, reason):
    code = _FORKING_PARENT.format(hide_tbb=hide_tbb, tests=os.path.dirname(__file__))
    used, why = _run(code, **environment).splitlines()
    assert used == layer
    assert why.startswith(reason)


def test_info_says_why_the_layer_is_not_tbb():
    code = """
        import sys
        sys.modules["numba.np.ufunc.tbbpool"] = None
        from accelbn._cli import info
        info.print_info()
    """
    lines = dict(line.split(": ", 1) for line in _run(code).splitlines())
    assert lines["numba threading layer"].startswith("omp (not tbb: Numba's TBB layer did not load (")


def _run(code, **env):
    """Run ``code`` in a fresh interpreter with extra environment variables; its stdout."""
    process = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
    )
    assert process.returncode == 0, process.stderr
    return process.stdout


_CHILD = """
    import sys, hashlib
    sys.path.insert(0, {tests!r})
    from test_threads import _serial
    print(hashlib.sha256(b"".join(_serial([0, 1, 2]))).hexdigest())
"""


def _digest(**env):
    return _run(_CHILD.format(tests=os.path.dirname(__file__)), **env).strip()


def test_results_do_not_depend_on_the_thread_count():
    assert _digest(ACCELBN_NUM_THREADS="1") == _digest(ACCELBN_NUM_THREADS="2") == _digest()


def test_workqueue_layer_is_serialized_not_aborted():
    code = """
        import concurrent.futures, sys, numba
        sys.path.insert(0, {tests!r})
        from test_threads import _serial, _work
        seeds = list(range(8))
        expected = _serial(seeds)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            assert list(pool.map(_work, seeds)) == expected
        print(numba.threading_layer())
    """
    assert _run(code.format(tests=os.path.dirname(__file__)), NUMBA_THREADING_LAYER="workqueue").strip() == "workqueue"


def test_accelbn_num_threads_is_honoured_and_restored():
    code = """
        import numba, numpy as np, accelbn as abn
        from accelbn.backends.numba_cpu import runtime
        abn.batch_norm(np.ones((4, 3), np.float32), None, None, training=True)
        large = np.empty(runtime.SERIAL_MAX_ELEMENTS + 1)  # small inputs run serial kernels: no threads to set
        seen = runtime.entry(lambda kernels, x: numba.get_num_threads())(large)
        print(seen, numba.get_num_threads() == numba.config.NUMBA_NUM_THREADS)
    """
    assert _run(code, ACCELBN_NUM_THREADS="1").split() == ["1", "True"]
    assert _run(code).split() == [str(numba.config.NUMBA_NUM_THREADS), "True"]


def test_numba_set_num_threads_is_honoured():
    numba.set_num_threads(1)
    try:
        large = np.empty(runtime.SERIAL_MAX_ELEMENTS + 1)
        assert runtime.entry(lambda kernels, x: numba.get_num_threads())(large) == 1
    finally:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)


@pytest.mark.parametrize("value", ["0", "two", "100000"])
def test_bad_accelbn_num_threads_is_a_clear_error(value):
    process = subprocess.run(
        [sys.executable, "-c", "import numpy as np, accelbn as abn; abn.batch_norm(np.ones((4, 3)), None, None, True)"],
        env={**os.environ, "ACCELBN_NUM_THREADS": value},
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
    )
    assert process.returncode != 0
    assert "ACCELBN_NUM_THREADS must be an integer from 1 to" in process.stderr
    assert repr(value) in process.stderr


@pytest.mark.slow
def test_processes_compiling_into_one_empty_cache_at_once(tmp_path):
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    command = [sys.executable, "-c", textwrap.dedent(_CHILD.format(tests=os.path.dirname(__file__)))]
    processes = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        digests = [p.communicate(timeout=2 * CHILD_TIMEOUT)[0].strip() for p in processes]
    finally:
        for p in processes:
            p.kill()
    assert [p.returncode for p in processes] == [0] * 2
    assert any(tmp_path.rglob("*.nbc")), "nothing was cached"
    assert len(set(digests)) == 1 and digests[0]
    assert _digest(NUMBA_CACHE_DIR=str(tmp_path)) == digests[0]  # loaded from the cache
