"""The command line, run as users run it: ``python -m accelbn`` in a subprocess."""

import re
import subprocess
import sys

import pytest

import accelbn

QUICK_SHAPES = {("32x64x56x56", "NCHW"), ("32x56x56x64", "NHWC"), ("4096x256", "NC"), ("4x8x4x4", "NCHW")}
PASSES = {"train", "eval", "backward"}


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


def test_info_prints_version_and_backends():
    result = run_cli("info")
    assert result.returncode == 0, result.stderr
    fields = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    assert fields["accelbn"] == accelbn.__version__
    assert "numba" in fields["backends"].split(", ")
    assert int(fields["numba threads"]) >= 1


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


def test_unknown_command_exits_with_usage():
    result = run_cli("frobnicate")
    assert result.returncode != 0
    assert "usage:" in result.stderr
