"""The command line, ``python -m accelbn``: argument parsing here; the commands live beside it, in
:mod:`.info`, :mod:`.precompile` (``compile``), :mod:`.bench` and :mod:`.demo`."""

import argparse


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _parser():
    parser = argparse.ArgumentParser(prog="python -m accelbn", description="accelbn command line")
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    commands.add_parser("info", help="versions, backends, Numba threading and CPU, one 'key: value' per line")
    commands.add_parser(
        "compile", help="compile every CPU kernel into Numba's on-disk cache ahead of time (for images and CI)"
    )
    bench = commands.add_parser(
        "bench", help="time accelbn against a memory copy, NumPy, PyTorch CPU and ONNX Runtime"
    )
    bench.add_argument("--quick", action="store_true", help="a small grid that runs in seconds")
    bench.add_argument(
        "--repeat", type=_positive_int, metavar="N", help="timed runs of each callable (default: 7, or 5 with --quick)"
    )
    bench.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    bench.add_argument("--op", default="batch_norm", metavar="NAME",
                       choices=("batch_norm", "layer_norm", "rms_norm", "group_norm", "instance_norm"),
                       help="the operation: batch_norm (default), layer_norm, rms_norm, group_norm or instance_norm")
    bench.add_argument("--fused", action="store_true",
                       help="the fused ReLU and residual+ReLU ops and batch renorm against batch norm's own passes")
    bench.add_argument("--sync", action="store_true",
                       help="synchronized batch norm's all-reduces against its local kernels (run under mpiexec -n 2)")
    demo = commands.add_parser(
        "demo", help="train a small CNN with and without batch norm: a learning-rate sweep, momentum, a batch of one"
    )
    demo.add_argument("--quick", action="store_true", help="one seed, 6 epochs: under 2 minutes on 2 cores")
    demo.add_argument("--data", choices=("digits", "cifar10"), default="digits",
                      help="scikit-learn's bundled digits (default), or CIFAR-10 from --path")
    demo.add_argument("--path", metavar="DIR", help="the folder of CIFAR-10's python batches")
    demo.add_argument("--limit", type=_positive_int, metavar="N", help="use the first N training images (CIFAR-10)")
    demo.add_argument("--backend", choices=("numpy", "cupy"), default="numpy", help="the arrays the CNN runs on")
    demo.add_argument("--experiment", action="append", choices=("lr", "momentum", "batch1"), dest="experiments",
                      help="run only this experiment (repeatable; default: all three)")
    demo.add_argument("--epochs", type=_positive_int, metavar="N", help="epochs per run (default: 15, or 6 with --quick)")
    demo.add_argument("--seeds", type=_positive_int, metavar="N", help="seeds per setting (default: 3, or 1 with --quick)")
    demo.add_argument("--out", default="accelbn-demo", metavar="DIR", help="where summary.md, results.json and the plots go")
    demo.add_argument("--json", action="store_true", help="print the results as JSON instead of the Markdown summary")
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    # Imported per command: bench and compile need Numba, and info must still work without it.
    if args.command == "info":
        from accelbn._cli import info

        info.print_info()
    elif args.command == "compile":
        from accelbn._cli import precompile

        precompile.run()
    elif args.command == "demo":
        from accelbn._cli import demo

        demo.run(quick=args.quick, data_name=args.data, path=args.path, limit=args.limit, backend=args.backend,
                  chosen=tuple(args.experiments or demo.EXPERIMENTS), out=args.out, as_json=args.json,
                  seed_override=None if args.seeds is None else range(args.seeds), epochs_override=args.epochs)
    elif args.sync:
        from accelbn._cli import bench_sync

        bench_sync.run(quick=args.quick, repeat=args.repeat)
    elif args.fused:
        from accelbn._cli import bench_fused

        bench_fused.run(quick=args.quick, repeat=args.repeat)
    else:
        if args.op == "batch_norm":
            from accelbn._cli import bench

            bench.run(quick=args.quick, repeat=args.repeat, as_json=args.json)
        else:
            from accelbn._cli import bench_family

            bench_family.run(args.op, quick=args.quick, repeat=args.repeat, as_json=args.json)
    return 0

