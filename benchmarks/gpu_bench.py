"""GPU timings of accelbn's CuPy backend: train, eval and backward over the CPU benchmark grid plus
ResNet-50's batch-norm shapes (NCHW and NHWC, float32 and float16), each against a device-to-device
copy of x and against PyTorch (cuDNN) on the same GPU when a CUDA build of torch is installed; and
the fused ReLU and residual-plus-ReLU (train forward and backward) and Batch Renormalization's train
forward, whose ratios to the train and backward rows are the fused ops' cost.

    python benchmarks/gpu_bench.py [--repeat 20] [--quick]

Times are medians of CUDA-event intervals on CuPy's current stream, after a warm-up call, with
the copy, accelbn and PyTorch timed interleaved. Prints a Markdown table headed by the device name
and date, ready for benchmarks/RESULTS.md. (CuPy is imported in main(): asv imports every module
in this folder, also where CuPy is not installed.)
"""

import argparse
import datetime
import statistics

import numpy as np

import accelbn as abn
from accelbn._cli.grid import EPS, FULL_GRID, MOMENTUM, Case

RESNET50_SHAPES = [(64, 64, 112, 112), (64, 256, 56, 56), (64, 512, 28, 28), (64, 1024, 14, 14), (64, 2048, 7, 7)]
RESNET50_GRID = tuple(
    Case(shape if layout == "NCHW" else (shape[0], shape[2], shape[3], shape[1]), layout, dtype)
    for shape in RESNET50_SHAPES
    for layout in ("NCHW", "NHWC")
    for dtype in (np.float32, np.float16)
)
QUICK_GRID = (
    Case((64, 256, 56, 56), "NCHW"),
    Case((64, 56, 56, 256), "NHWC"),
    Case((64, 256, 56, 56), "NCHW", np.float16),
)
PASSES = ("train", "eval", "backward", "relu train", "add_relu train", "renorm train", "relu backward",
          "add_relu backward")


def _elapsed_ms(cupy, call):
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    start.record()
    call()
    stop.record()
    stop.synchronize()
    return cupy.cuda.get_elapsed_time(start, stop)


def _accelbn_calls(cupy, case, x, dy):
    channels = case.shape[case.axis]
    weight, bias = cupy.ones(channels, cupy.float32), cupy.zeros(channels, cupy.float32)
    running_mean, running_var = cupy.zeros(channels, cupy.float32), cupy.ones(channels, cupy.float32)
    out = cupy.empty_like(x)
    _, stats = abn.batch_norm(x, None, None, weight, bias, True, axis=case.axis, return_stats=True)
    z = cupy.ascontiguousarray(dy[::-1])  # a residual: any array of x's shape
    fused = {residual: abn.batch_norm_relu(x, None, None, weight, bias, True, residual=z if residual else None,
                                           axis=case.axis, return_stats=True)[1] for residual in (False, True)}
    renorm = [cupy.zeros(channels, cupy.float32), cupy.ones(channels, cupy.float32), cupy.ones(channels, cupy.float32),
              cupy.zeros(channels, cupy.float32), cupy.ones(channels, cupy.float32)]
    return {
        "train": lambda: abn.batch_norm(
            x, running_mean, running_var, weight, bias, True, MOMENTUM, EPS, axis=case.axis, out=out
        ),
        "eval": lambda: abn.batch_norm(x, running_mean, running_var, weight, bias, False, axis=case.axis, out=out),
        "backward": lambda: abn.batch_norm_backward(dy, x, stats, weight, axis=case.axis, out=out),
        "relu train": lambda: abn.batch_norm_relu(x, None, None, weight, bias, True, axis=case.axis, out=out),
        "add_relu train": lambda: abn.batch_norm_relu(x, None, None, weight, bias, True, residual=z, axis=case.axis,
                                                      out=out),
        "renorm train": lambda: abn.batch_renorm(x, *renorm, weight, bias, True, axis=case.axis, out=out),
        "relu backward": lambda: abn.batch_norm_relu_backward(dy, x, fused[False], weight, bias, axis=case.axis, out=out),
        "add_relu backward": lambda: abn.batch_norm_relu_backward(dy, x, fused[True], weight, bias, residual=z,
                                                                  axis=case.axis, out=out),
    }


def _torch_calls(case, x, dy, torch):
    """PyTorch on the same data, through cuDNN, with NHWC as channels_last memory format."""
    channels = case.shape[case.axis]
    to_nchw = (lambda a: a) if case.layout != "NHWC" else (lambda a: a.permute(0, 3, 1, 2))
    tx = to_nchw(torch.from_dlpack(x)).requires_grad_()
    tdy = to_nchw(torch.from_dlpack(dy))
    weight = torch.ones(channels, device=tx.device, requires_grad=True)
    bias = torch.zeros(channels, device=tx.device, requires_grad=True)
    running_mean, running_var = torch.zeros(channels, device=tx.device), torch.ones(channels, device=tx.device)
    forward = lambda training: torch.nn.functional.batch_norm(  # noqa: E731
        tx, running_mean, running_var, weight, bias, training, MOMENTUM, EPS
    )
    y = forward(True)  # the graph the backward pass runs on

    def no_grad(training):
        def run():
            with torch.no_grad():
                forward(training)

        return run

    def backward():
        torch.autograd.grad(y, (tx, weight, bias), tdy, retain_graph=True)

    return {"train": no_grad(True), "eval": no_grad(False), "backward": backward}


def _import_cuda_torch():
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def measure(cupy, grid, repeat):
    torch = _import_cuda_torch()
    rows = []
    rng = np.random.default_rng(0)
    for case in grid:
        x = cupy.asarray(rng.standard_normal(case.shape, dtype=np.float32).astype(case.dtype))
        dy = cupy.asarray(rng.standard_normal(case.shape, dtype=np.float32).astype(case.dtype))
        copy_out = cupy.empty_like(x)
        copy = lambda: cupy.copyto(copy_out, x)  # noqa: E731
        ours = _accelbn_calls(cupy, case, x, dy)
        theirs = _torch_calls(case, x, dy, torch) if torch is not None else {}
        for name in PASSES:
            calls = [copy, ours[name]] + ([theirs[name]] if name in theirs else [])
            for call in calls:
                call()  # warm-up: compiles, fills the memory pool
            times = [[] for _ in calls]
            for _ in range(repeat):
                for call, series in zip(calls, times):
                    series.append(_elapsed_ms(cupy, call))
            copy_ms, ours_ms, *torch_ms = (statistics.median(t) for t in times)
            rows.append((case, name, copy_ms, ours_ms, torch_ms[0] if torch_ms else None))
    return rows, torch


def format_table(cupy, rows, torch, repeat):
    device = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"].decode()
    torch_line = (
        f"PyTorch {torch.__version__} (cuDNN {torch.backends.cudnn.version()})"
        if torch
        else "PyTorch: not installed with CUDA"
    )
    lines = [
        f"Device: {device}; {datetime.date.today().isoformat()}; CuPy {cupy.__version__}; {torch_line}; "
        f"medians of {repeat} CUDA-event timings, interleaved",
        "",
        "| case | dtype | pass | copy ms | accelbn ms | accelbn/copy | PyTorch ms | speedup vs PyTorch |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for case, name, copy_ms, ours_ms, torch_ms in rows:
        torch_cells = f"{torch_ms:.3f} | {torch_ms / ours_ms:.2f}x" if torch_ms is not None else "n/a | n/a"
        lines.append(
            f"| {case.layout} {case.label} | {np.dtype(case.dtype).name} | {name} | {copy_ms:.3f} | {ours_ms:.3f} | "
            f"{ours_ms / copy_ms:.2f} | {torch_cells} |"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="three shapes instead of the full grid")
    args = parser.parse_args()
    import cupy

    grid = QUICK_GRID if args.quick else FULL_GRID + RESNET50_GRID
    rows, torch = measure(cupy, grid, args.repeat)
    print(format_table(cupy, rows, torch, args.repeat))


if __name__ == "__main__":
    main()
