"""The command line, ``python -m accelbn``: argument parsing only; the commands live in
:mod:`accelbn._info` (``info``), :mod:`accelbn._compile` (``compile``) and :mod:`accelbn._bench`
(``bench``)."""

import argparse
import sys


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
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    # Imported per command: bench and compile need Numba, and info must still work without it.
    if args.command == "info":
        from accelbn import _info

        _info.print_info()
    elif args.command == "compile":
        from accelbn import _compile

        _compile.run()
    else:
        from accelbn import _bench

        _bench.run(quick=args.quick, repeat=args.repeat, as_json=args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
