"""The command line: run as users run it, ``python -m accelbn`` in a subprocess, and bench's
output checked in this process on a tiny grid."""

import json
import os
import re
import subprocess
import sys

import numba
import numpy as np
import pytest

import accelbn
from accelbn._cli import bench as _bench
from accelbn.__main__ import main

QUICK_SHAPES = {("32x64x56x56", "NCHW"), ("32x56x56x64", "NHWC"), ("4096x256", "NC"), ("4x8x4x4", "NCHW")}
PASSES = {"train", "eval", "backward"}
# One small case per layout, so that in-process runs of the bench take a fraction of a second.
TINY_GRID = (_bench.Case((4, 8, 4, 4), "NCHW"), _bench.Case((4, 4, 4, 8), "NHWC"), _bench.Case((64, 8), "NC"))


def run_cli(*args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "accelbn", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def table_rows(stdout):
    """The bench table as one dict per row, keyed by column title; columns are 2+ spaces apart."""
    lines = stdout.splitlines()
    title_index = next(i for i, line in enumerate(lines) if line.startswith("shape "))
    titles = re.split(r"\s{2,}", lines[title_index].strip())
    rows = [re.split(r"\s{2,}", line.strip()) for line in lines[title_index + 1 :] if line.strip()]
    assert all(len(row) == len(titles) for row in rows), stdout
    return [dict(zip(titles, row)) for row in rows]


@pytest.fixture
def bench(monkeypatch, capsys):
    """``python -m accelbn bench --quick ARGS`` in this process on TINY_GRID; returns stdout."""
    monkeypatch.setattr(_bench, "QUICK_GRID", TINY_GRID)

    def run(*args):
        assert main(["bench", "--quick", *args]) == 0
        return capsys.readouterr().out

    return run


@pytest.fixture
def without_onnxruntime(monkeypatch):
    monkeypatch.setattr(_bench, "_import_onnxruntime", lambda: None)


def test_info_prints_version_and_backends():
    result = run_cli("info")
    assert result.returncode == 0, result.stderr
    fields = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    assert fields["accelbn"] == accelbn.__version__
    assert "numba" in fields["backends"].split(", ")
    assert int(fields["numba threads"]) >= 1
    assert fields["mpi"].startswith("mpi4py ") and "CuPy buffers staged through host memory" in fields["mpi"]


def test_bench_compiles_cases_that_share_kernels_in_one_worker():
    groups = _bench._kernel_groups(_bench.QUICK_GRID)
    layouts = sorted(sorted(case.layout for case in group) for group in groups)
    assert layouts == [["NC", "NHWC"], ["NCHW"], ["NCHW"]]


@pytest.mark.slow
def test_compile_reports_each_job_and_the_total():
    result = run_cli("compile", timeout=900)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    jobs = sorted(line.split(":")[0] for line in lines[:-1])
    assert jobs == sorted(f"{d} {k} kernels" for d in ("float32", "float64") for k in ("serial", "parallel"))
    assert lines[-1].startswith("all CPU kernels compiled or loaded from the cache in ")
    assert "accelbn: compiling" not in result.stderr  # the command reports for itself


@pytest.mark.slow
def test_bench_quick_has_a_row_per_shape_and_pass():
    result = run_cli("bench", "--quick", "--repeat", "1")
    assert result.returncode == 0, result.stderr
    rows = table_rows(result.stdout)
    assert sorted((r["shape"], r["layout"], r["pass"]) for r in rows) == sorted(
        (shape, layout, pass_name) for shape, layout in QUICK_SHAPES for pass_name in PASSES
    )
    for row in rows:
        assert float(row["accelbn/copy"]) > 0
        assert float(row["accelbn ms"]) > 0


def check_results(results, onnxruntime_installed):
    assert sorted((tuple(r["shape"]), r["layout"], r["pass"]) for r in results) == sorted(
        (case.shape, case.layout, pass_name) for case in TINY_GRID for pass_name in PASSES
    )
    for r in results:
        assert r["dtype"] == "float32"
        # torch is in the test extra, so its column is always measured here.
        for key in ("copy_ms", "accelbn_ms", "numpy_ms", "torch_ms"):
            assert isinstance(r[key], float) and r[key] > 0, (key, r)
        assert r["ratio_to_copy"] == r["accelbn_ms"] / r["copy_ms"]
        assert r["speedup_vs_torch"] == r["torch_ms"] / r["accelbn_ms"]
        if onnxruntime_installed and r["pass"] == "eval":
            assert isinstance(r["onnxruntime_ms"], float) and r["onnxruntime_ms"] > 0, r
        else:
            assert r["onnxruntime_ms"] is None, r


def test_bench_json_has_a_result_per_case_and_pass(bench):
    document = json.loads(bench("--json", "--repeat", "2"))
    assert document["accelbn_version"] == accelbn.__version__
    assert document["repeat"] == 2
    assert document["threads"] == numba.get_num_threads()
    assert document["threading_layer"] == numba.threading_layer()
    assert document["cpu"] and document["date"]
    check_results(document["results"], onnxruntime_installed=_bench._import_onnxruntime() is not None)


def test_bench_json_has_null_onnxruntime_times_without_onnxruntime(bench, without_onnxruntime):
    check_results(json.loads(bench("--json", "--repeat", "1"))["results"], onnxruntime_installed=False)


def test_bench_table_has_no_onnxruntime_column_without_onnxruntime(bench, without_onnxruntime):
    rows = table_rows(bench("--repeat", "1"))
    assert len(rows) == len(TINY_GRID) * len(PASSES)
    assert "onnxruntime ms" not in rows[0]


def test_bench_table_has_onnxruntime_times_for_eval_only(bench):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    for row in table_rows(bench("--repeat", "1")):
        assert (row["onnxruntime ms"] == "-") == (row["pass"] != "eval"), row


@pytest.mark.parametrize("chosen", [None, "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME"])
def test_bench_stops_torch_threads_spinning_unless_the_user_chose(monkeypatch, chosen):
    # Spinning OpenMP threads of torch would take the cores of the callable timed after it.
    knobs = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
    environment = {k: v for k, v in os.environ.items() if k not in knobs}
    if chosen is not None:
        environment[chosen] = "users-value"
    monkeypatch.setattr(os, "environ", environment)
    _bench._import_torch()
    if chosen is None:
        assert (environment["GOMP_SPINCOUNT"], environment["KMP_BLOCKTIME"]) == ("10000", "1")
    else:
        assert {k: environment.get(k) for k in knobs} == {k: "users-value" if k == chosen else None for k in knobs}


@pytest.mark.parametrize(
    "case",
    TINY_GRID + (_bench.Case((4, 8, 4, 4), "NCHW", np.float64),),
    ids=lambda case: f"{case.label}-{case.layout}-{np.dtype(case.dtype).name}",
)
def test_onnxruntime_eval_matches_accelbn(case):
    pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    rng = np.random.default_rng(1)
    arrays = _bench._Arrays(case, rng)
    # Running statistics away from 0 and 1, so that a mean or variance put in the wrong slot shows.
    arrays.running_mean[...] = rng.standard_normal(arrays.running_mean.shape)
    arrays.running_var[...] = rng.uniform(0.5, 2.0, arrays.running_var.shape)
    got = _bench._onnxruntime_calls(arrays, onnxruntime)["eval"]()
    _bench._accelbn_calls(arrays)["eval"]()
    np.testing.assert_allclose(got, arrays.y, rtol=1e-5, atol=1e-5)


def test_unknown_command_exits_with_usage():
    result = run_cli("frobnicate")
    assert result.returncode != 0
    assert "usage:" in result.stderr


@pytest.mark.parametrize("case", TINY_GRID, ids=lambda case: f"{case.label}-{case.layout}")
def test_bench_times_what_it_says(case):
    """Every callable the bench times (accelbn, its NumPy and PyTorch baselines) computes the pass it
    is named after: train (with the running statistics' update), eval after it, and backward, each
    against the oracle, so that no column compares unlike work."""
    import oracle
    import torch
    from support import rel_error

    a = _bench._Arrays(case, np.random.default_rng(2))
    axis, channels = a.case.axis, a.x.shape[a.channel_axis]
    calls = {"accelbn": _bench._accelbn_calls(a), "numpy": _bench._numpy_calls(a), "torch": _bench._torch_calls(a, torch)}
    train = oracle.batch_norm(a.x, np.zeros(channels), np.ones(channels), a.weight, a.bias, True, _bench.MOMENTUM,
                              _bench.EPS, axis)
    evaluated = oracle.batch_norm(a.x, train.running_mean, train.running_var, a.weight, a.bias, False, eps=_bench.EPS,
                                  axis=axis).y
    dx, dweight, dbias = oracle.batch_norm_backward(a.dy, a.x, a.stats.mean, a.stats.invstd, a.weight, True, axis)

    def host(result, name):
        if name == "accelbn":
            return result
        result = result.detach() if hasattr(result, "detach") else result
        result = np.asarray(result)
        return np.moveaxis(result, 1, -1) if name == "torch" and case.layout == "NHWC" else result

    for name, call in calls.items():
        y = a.y if name == "accelbn" else None
        got = call["train"]()
        assert rel_error(host(y if got is None else got, name), train.y) < 2e-5, name
        got = call["eval"]()
        assert rel_error(host(y if got is None else got, name), evaluated) < 2e-5, name
        got = call["backward"]()
        grads = (a.dx,) if got is None else got
        assert rel_error(host(grads[0], name), dx) < 2e-5, name
        if got is not None:
            assert rel_error(np.asarray(grads[1]).ravel(), dweight) < 2e-5, name
            assert rel_error(np.asarray(grads[2]).ravel(), dbias) < 2e-5, name
    np.testing.assert_allclose(a.running_mean, train.running_mean, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(a.running_var, train.running_var, rtol=1e-5)


@pytest.mark.parametrize("operation", ["layer_norm", "rms_norm", "group_norm", "instance_norm"])
def test_bench_op_times_each_operation_against_a_copy_and_torch(operation, monkeypatch, capsys):
    from accelbn._cli import bench_family, grid

    tiny = {"layer_norm": (grid.Case((64, 32), "NC"),), "rms_norm": (grid.Case((64, 32), "NC"),),
            "group_norm": (grid.Case((2, 64, 3, 3), "NCHW"), grid.Case((2, 3, 3, 64), "NHWC")),
            "instance_norm": (grid.Case((2, 4, 3, 3), "NCHW"), grid.Case((2, 3, 3, 4), "NHWC"))}
    monkeypatch.setattr(bench_family, "FAMILY_QUICK_GRID", tiny)
    assert main(["bench", "--op", operation, "--quick", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{operation}; cpu: ")
    rows = table_rows(out)
    assert [(r["shape"], r["pass"]) for r in rows] == [(c.label, p) for c in tiny[operation] for p in ("forward", "backward")]
    for row in rows:
        assert float(row["accelbn/copy"]) > 0 and float(row["torch ms"]) > 0 and row["numpy ms"] == "-"


def test_bench_op_rejects_an_unknown_operation():
    result = run_cli("bench", "--op", "batchnorm")
    assert result.returncode == 2 and "invalid choice: 'batchnorm'" in result.stderr
