"""The README's examples run as written."""

import os
import pathlib
import re
import shutil
import subprocess
import sys

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_usage_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    exec(compile(blocks[0], str(README), "exec"), {})
    assert "numba" in capsys.readouterr().out


def test_beyond_batch_norm_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    [block] = [b for b in blocks if "batch_norm_relu" in b]
    exec(compile(block, str(README), "exec"), {})
    assert "moving_stddev" in capsys.readouterr().out


def test_multi_process_example_runs_under_mpiexec(tmp_path):
    """The SyncBatchNorm example, saved as the README names it and run as it says (`mpiexec -n 2`):
    both processes print the same running mean."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    [block] = [b for b in blocks if "# train_sync.py" in b]
    assert "mpiexec -n 2 python train_sync.py" in README.read_text()
    script = tmp_path / "train_sync.py"
    script.write_text(block)
    mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
    result = subprocess.run([mpiexec, "-n", "2", sys.executable, str(script)], capture_output=True, text=True,
                            timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    printed = dict(re.findall(r"rank (\d+): (\[[^\]]*\])", result.stdout))  # the two processes' lines may interleave
    assert sorted(printed) == ["0", "1"] and printed["0"] == printed["1"], result.stdout
