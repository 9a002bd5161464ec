"""Plant realistic bugs in the CPU path one at a time and show the test suite kills each.

    python tests/mutants.py              # every mutant; prints a Markdown table
    python tests/mutants.py --only NAME  # the mutants whose name contains NAME

Each mutant replaces one piece of text in one file of the working tree, runs the CPU tests with
``-x`` (the files most likely to kill it first), and restores the file, also on Ctrl-C. The files it
edits must have no uncommitted changes. A mutant "survives" when every test passes: the suite does
not hold the promise the bug breaks. Not part of the test run (it takes minutes: most mutants
change a kernel's source, which recompiles the kernels); the GPU kernels' planted bugs are in
test_cudaemu.py and do run in CI.
"""

import argparse
import pathlib
import re
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent

# (name, file, original text, replacement): each a bug someone could write.
MUTANTS = [
    ("Batch Renormalization's d not clipped", "backends/formulas.py",
     "d = np.minimum(np.maximum((mean - renorm_mean) / std, -dmax), dmax)", "d = (mean - renorm_mean) / std"),
    ("the fused ReLU's backward mask without the residual", "backends/numba_cpu/elements.py",
     "return passed(_affine(x, mean_hi, mean_lo, scale, shift) + z, dy)", "return passed(_affine(x, mean_hi, mean_lo, scale, shift), dy)"),
    ("running variance blended with the biased variance", "accelbn/_ops/batch_norm.py",
     "new_var = running_average(running_var, var * (count / (count - 1)) if unbiased else var, momentum)",
     "new_var = running_average(running_var, var, momentum)"),
    ("momentum of the opposite meaning (Keras')", "backends/formulas.py",
     "return (1.0 - momentum) * running.astype(np.float64) + momentum * batch",
     "return momentum * running.astype(np.float64) + (1.0 - momentum) * batch"),
    ("eps outside the square root", "backends/formulas.py",
     "return 1.0 / np.sqrt(var + eps)", "return 1.0 / (np.sqrt(var) + eps)"),
    ("dbias the mean of dy, not its sum", "accelbn/_ops/batch_norm.py",
     "return dx.result(), dresidual, sum_dy_xmu * invstd, sum_dy\n",
     "return dx.result(), dresidual, sum_dy_xmu * invstd, sum_dy / (x.size // channels)\n"),
    ("dweight without the inverse std", "accelbn/_ops/batch_norm.py",
     "return dx.result(), dresidual, sum_dy_xmu * invstd, sum_dy\n", "return dx.result(), dresidual, sum_dy_xmu, sum_dy\n"),
    ("saved invstd from the unbiased variance", "accelbn/_ops/batch_norm.py",
     "invstd = inverse_std(var, eps)  # only the saved statistics need it",
     "invstd = inverse_std(var * count / (count - 1) if training else var, eps)"),
    ("a segment of a long row one element short", "backends/numba_cpu/tiling.py",
     "return r, rc - r * x.shape[1], f0, min(f0 + ROW_SEGMENT, x.shape[2])",
     "return r, rc - r * x.shape[1], f0, min(f0 + ROW_SEGMENT - 1, x.shape[2])"),
    ("a statistics chunk one row too long", "backends/numba_cpu/tiling.py",
     "return g * rows, min(g * rows + rows, x.shape[0]), i0, min(i0 + STATS_CHUNK, x.shape[2])",
     "return g * rows, min(g * rows + rows + 1, x.shape[0]), i0, min(i0 + STATS_CHUNK, x.shape[2])"),
    ("a short-row task one row short", "backends/numba_cpu/batch_norm_short_rows.py",
     "return c0, min(c0 + block, channels), g * x.shape[0] // groups, (g + 1) * x.shape[0] // groups",
     "return c0, min(c0 + block, channels), g * x.shape[0] // groups, max(g * x.shape[0] // groups, (g + 1) * x.shape[0] // groups - 1)"),
    ("a reversed inner axis taken as unit stride", "backends/numba_cpu/tiling.py",
     "if inner == 1 or (a.strides[2] == a.itemsize and",
     "if inner == 1 or (abs(a.strides[2]) == a.itemsize and"),
    ("float32 products in the gradient sums", "backends/numba_cpu/reductions.py",
     "        g = np.float64(dy[i])\n        sum_dy += g\n        sum_dy_xmu += g * (np.float64(x[i]) - mean)",
     "        g = dy[i]\n        sum_dy += g\n        sum_dy_xmu += g * (x[i] - np.float32(mean))"),
    ("no float64 redo of a float32 run that overflows", "backends/numba_cpu/reductions.py",
     "    s = _runs_shifted(v, as_element(v, shift), as_element(v, 0.0))\n    if not np.isfinite(s):",
     "    s = _runs_shifted(v, as_element(v, shift), as_element(v, 0.0))\n    if False:"),
    ("frozen backward with the training gradient", "accelbn/_ops/batch_norm.py",
     "kernels.backward(dy3, x3, mean, invstd, applied, training, dx.view, masked)",
     "kernels.backward(dy3, x3, mean, invstd, applied, True, dx.view, masked)"),
    ("an empty batch in training updates the running statistics", "accelbn/_ops/batch_norm.py",
     "if training and x.size == 0:", "if training and x.size == 0 and running_mean is None:"),
    ("running statistics updated before the batch is checked", "accelbn/_ops/batch_norm.py",
     "        if count == 1:\n            raise ValueError(",
     "        if count == 1:\n            running_mean is not None and running_mean.fill(0)\n            raise ValueError("),
]

TESTS = ["tests/test_batch_norm_paths.py", "tests/test_batch_norm_torch.py", "tests/test_batch_norm.py",
         "tests/test_batch_norm_numerics.py", "tests/test_batch_norm_layer.py", "tests/test_errors.py",
         "tests/test_batch_norm_properties.py", "tests/test_batch_norm_gradcheck.py"]
COMMAND = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "not gpu and not slow", *TESTS]


def _killed_by(output):
    match = re.search(r"^FAILED (.+?)(?: - |$)", output, flags=re.M)
    return match.group(1) if match else None


def run(mutant):
    name, path, original, replacement = mutant
    file = ROOT / path
    source = file.read_text()
    if source.count(original) != 1:
        return name, path, "the mutation no longer matches its file", 0.0
    start = time.time()
    try:
        file.write_text(source.replace(original, replacement))
        result = subprocess.run(COMMAND, cwd=ROOT, capture_output=True, text=True)
    finally:
        file.write_text(source)
    killer = _killed_by(result.stdout) if result.returncode else None
    if result.returncode and killer is None:
        killer = f"pytest exit {result.returncode}: " + result.stdout.strip().splitlines()[-1]
    return name, path, killer or "SURVIVED", time.time() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="", help="run the mutants whose name contains this")
    args = parser.parse_args()
    files = sorted({m[1] for m in MUTANTS})
    dirty = subprocess.run(["git", "status", "--porcelain", *files], cwd=ROOT, capture_output=True, text=True).stdout
    if dirty.strip():
        sys.exit(f"commit or stash the changes to these files first:\n{dirty}")
    print("| mutant | file | killed by | seconds |\n| --- | --- | --- | --- |", flush=True)
    survived = 0
    for mutant in MUTANTS:
        if args.only not in mutant[0]:
            continue
        name, path, killer, seconds = run(mutant)
        survived += killer == "SURVIVED"
        print(f"| {name} | {path} | {killer} | {seconds:.0f} |", flush=True)
    sys.exit(1 if survived else 0)


if __name__ == "__main__":
    main()
