"""Safe wherever it is called: Python threads, forked and spawned children, thread-count settings,
and a compile cache shared by processes. Results must be bitwise those of a serial call."""

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


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_child_process_after_parent_used_the_kernels(method):
    seeds = [0, 1, 2]
    expected = _serial(seeds)  # the parent has now run every kernel family
    context = multiprocessing.get_context(method)
    with context.Pool(2) as pool:
        assert pool.map(_work, seeds, chunksize=1) == expected


def _run(code, **env):
    """Run ``code`` in a fresh interpreter with extra environment variables; its stdout."""
    process = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
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
        from accelbn.backends import numba_cpu
        abn.batch_norm(np.ones((4, 3), np.float32), None, None, training=True)
        large = np.empty(numba_cpu.SERIAL_MAX_ELEMENTS + 1)  # small inputs run serial kernels: no threads to set
        seen = numba_cpu._parallel_entry(lambda x: numba.get_num_threads())(large)
        print(seen, numba.get_num_threads() == numba.config.NUMBA_NUM_THREADS)
    """
    assert _run(code, ACCELBN_NUM_THREADS="1").split() == ["1", "True"]
    assert _run(code).split() == [str(numba.config.NUMBA_NUM_THREADS), "True"]


def test_numba_set_num_threads_is_honoured():
    from accelbn.backends import numba_cpu

    numba.set_num_threads(1)
    try:
        large = np.empty(numba_cpu.SERIAL_MAX_ELEMENTS + 1)
        assert numba_cpu._parallel_entry(lambda x: numba.get_num_threads())(large) == 1
    finally:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)


@pytest.mark.parametrize("value", ["0", "two", "100000"])
def test_bad_accelbn_num_threads_is_a_clear_error(value):
    process = subprocess.run(
        [sys.executable, "-c", "import numpy as np, accelbn as abn; abn.batch_norm(np.ones((4, 3)), None, None, True)"],
        env={**os.environ, "ACCELBN_NUM_THREADS": value},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert process.returncode != 0
    assert "ACCELBN_NUM_THREADS must be an integer from 1 to" in process.stderr
    assert repr(value) in process.stderr


@pytest.mark.slow
def test_processes_compiling_into_one_empty_cache_at_once(tmp_path):
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    command = [sys.executable, "-c", textwrap.dedent(_CHILD.format(tests=os.path.dirname(__file__)))]
    processes = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True) for _ in range(4)]
    digests = [p.communicate(timeout=600)[0].strip() for p in processes]
    assert [p.returncode for p in processes] == [0] * 4
    assert any(tmp_path.rglob("*.nbc")), "nothing was cached"
    assert len(set(digests)) == 1 and digests[0]
    assert _digest(NUMBA_CACHE_DIR=str(tmp_path)) == digests[0]  # loaded from the cache
