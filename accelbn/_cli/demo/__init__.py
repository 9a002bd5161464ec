"""``python -m accelbn demo``: the article's experiment, run by the library. A small CNN in array code
trains with ``accelbn.BatchNorm`` after each convolution and without it, over a learning-rate sweep;
then running-statistics momentum under a shift, and a batch of one. Prints a Markdown summary (or
JSON) and writes it, with PNG plots, to an output folder."""

import pathlib
import sys

from accelbn._cli.demo import data, experiments, report

EXPERIMENTS = ("lr", "momentum", "batch1")
# The article's sweep, and two larger rates: on digits both models train at 0.1, and the rate at
# which the model without normalization stops training is what the experiment is after.
LEARNING_RATES = (0.01, 0.05, 0.1, 0.5, 1.0)
QUICK = experiments.Settings(epochs=6, seeds=(0,), learning_rates=LEARNING_RATES)
FULL = experiments.Settings(epochs=15, seeds=(0, 1, 2), learning_rates=LEARNING_RATES)


class _Progress:
    """A one-line progress bar on stderr, advanced once per trained epoch."""

    def __init__(self, total, stream=sys.stderr):
        self.total, self.done, self.stream = total, 0, stream

    def __call__(self):
        self.done += 1
        filled = 30 * self.done // self.total
        bar = f"[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} epochs"
        if self.stream.isatty():
            self.stream.write("\r" + bar + ("\n" if self.done == self.total else ""))
        elif self.done == self.total or 4 * self.done // self.total != 4 * (self.done - 1) // self.total:
            self.stream.write(bar + "\n")  # a log file gets a line a quarter
        self.stream.flush()

    def finish(self):
        """Close the bar when runs that diverged stopped early and left epochs untrained."""
        if self.done < self.total and self.stream.isatty():
            self.stream.write("\n")


def _epochs_needed(settings, chosen):
    runs = 0
    if "lr" in chosen:
        runs += 2 * len(settings.learning_rates) * len(settings.seeds)
    if "momentum" in chosen:
        runs += len(experiments.KERAS_MOMENTA) * len(settings.seeds)
    if "batch1" in chosen:
        runs += 1
    return runs * settings.epochs


def _array_module(backend):
    if backend == "numpy":
        import numpy

        return numpy
    from accelbn._core.registry import require_library

    try:
        require_library("cupy")
    except ValueError as e:
        raise SystemExit(f"--backend cupy: {e}") from None
    import cupy

    return cupy


def run(*, quick=False, data_name="digits", path=None, limit=None, backend="numpy", chosen=EXPERIMENTS,
        out="accelbn-demo", as_json=False, seed_override=None, epochs_override=None):
    settings = QUICK if quick else FULL
    if seed_override is not None:
        settings = settings._replace(seeds=tuple(seed_override))
    if epochs_override is not None:
        settings = settings._replace(epochs=epochs_override)
    if data_name == "cifar10":
        if path is None:
            raise SystemExit("--data cifar10 needs --path DIR (the folder of CIFAR-10's python batches)")
        dataset = data.cifar10(path, limit)
        settings = settings._replace(target_accuracy=0.4)
    else:
        dataset = data.digits()
    xp = _array_module(backend)
    progress = _Progress(max(1, _epochs_needed(settings, chosen)))
    results = {"data": dataset.name, "epochs": settings.epochs, "seeds": list(settings.seeds), "backend": backend}
    histories = []
    if "lr" in chosen:
        histories = experiments.lr_sweep(dataset, settings, xp, progress)
        results["lr_sweep"] = report.sweep_rows(histories, settings.target_accuracy)
        results["curves"] = [h._asdict() for h in histories]
    if "momentum" in chosen:
        results["momentum"] = experiments.momentum_under_shift(dataset, settings, xp, progress)
    if "batch1" in chosen:
        results["batch_of_one"] = experiments.batch_of_one(dataset, settings, xp, progress)
    progress.finish()
    folder = pathlib.Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    summary = report.markdown(results)
    (folder / "summary.md").write_text(summary + "\n")
    (folder / "results.json").write_text(report.to_json(results) + "\n")
    written = report.plots(histories, folder) if histories else []
    if as_json:
        print(report.to_json(results))
    else:
        print(summary)
        wrote = ", ".join(str(p) for p in [folder / "summary.md", folder / "results.json", *written])
        print(f"wrote {wrote}" + ("" if written or not histories else " (no plots: pip install \"accelbn[demo]\")"))
    return results
