"""The demo's output: a Markdown summary, a JSON document, and PNG plots (matplotlib, optional)."""

import json
import statistics


def _mean(values):
    return statistics.fmean(values) if values else float("nan")


def sweep_rows(histories, target):
    """One row per (model, learning rate): mean final accuracy over seeds, runs that diverged or
    did not train (final accuracy under 50%), and the median steps to the target accuracy."""
    rows = []
    keys = sorted({(h.batch_norm, h.lr) for h in histories}, key=lambda k: (not k[0], k[1]))
    for batch_norm, lr in keys:
        runs = [h for h in histories if (h.batch_norm, h.lr) == (batch_norm, lr)]
        finals = [h.val_accuracy[-1] if h.val_accuracy and not h.diverged else 0.0 for h in runs]
        steps = [h.steps_to_target for h in runs if h.steps_to_target is not None]
        rows.append({
            "model": "batch norm" if batch_norm else "no normalization",
            "lr": lr,
            "seeds": len(runs),
            "final_val_accuracy": _mean(finals),
            "diverged": sum(h.diverged for h in runs),
            "did_not_train": sum(f < 0.5 for f in finals),
            "median_steps_to_target": statistics.median(steps) if steps else None,
            "reached_target": len(steps),
            "target": target,
        })
    return rows


def markdown(results):
    lines = [f"## accelbn demo: {results['data']}, {results['epochs']} epochs, seeds {results['seeds']}", ""]
    if "lr_sweep" in results:
        target = results["lr_sweep"][0]["target"]
        lines += [f"### Batch norm vs none over learning rates (target: {target:.0%} validation accuracy)", "",
                  "| model | lr | final val accuracy | diverged | did not train | steps to target |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for r in results["lr_sweep"]:
            steps = "-" if r["median_steps_to_target"] is None else f"{r['median_steps_to_target']:g} ({r['reached_target']}/{r['seeds']})"
            lines.append(f"| {r['model']} | {r['lr']:g} | {r['final_val_accuracy']:.1%} | {r['diverged']}/{r['seeds']} "
                         f"| {r['did_not_train']}/{r['seeds']} | {steps} |")
        lines.append("")
    if "momentum" in results:
        lines += ["### Running-statistics momentum, validation set with classes 0 and 1 swapped", "",
                  "| momentum (Keras) | accelbn momentum | val accuracy | val accuracy, 0 and 1 swapped |",
                  "| --- | --- | --- | --- |"]
        for r in results["momentum"]:
            lines.append(f"| {r['keras_momentum']:g} | {r['accelbn_momentum']:g} | {r['val_accuracy']:.1%} "
                         f"| {r['shifted_val_accuracy']:.1%} |")
        lines.append("")
    if "batch_of_one" in results:
        lines += ["### A batch of one", "", "| probe | result |", "| --- | --- |"]
        for probe, value in results["batch_of_one"].items():
            shown = f"{value:.1%} val accuracy" if isinstance(value, float) else value
            lines.append(f"| {probe} | {shown} |")
        lines.append("")
    return "\n".join(lines)


def to_json(results):
    return json.dumps(results, indent=2)


def plots(histories, folder):
    """learning_curves.png (training loss and validation accuracy per epoch, one panel per learning
    rate) and gradient_norms.png (per-layer weight-gradient norm); the paths written, or [] without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    lrs = sorted({h.lr for h in histories})
    written = []
    figure, axes = plt.subplots(2, len(lrs), figsize=(3.2 * len(lrs), 6), squeeze=False)
    for column, lr in enumerate(lrs):
        for h in (h for h in histories if h.lr == lr):
            color, label = ("tab:blue", "batch norm") if h.batch_norm else ("tab:red", "none")
            epochs = range(1, len(h.loss) + 1)
            axes[0][column].plot(epochs, h.loss, color=color, alpha=0.7, label=label if h.seed == histories[0].seed else None)
            axes[1][column].plot(epochs, h.val_accuracy, color=color, alpha=0.7)
        axes[0][column].set_title(f"lr {lr:g}")
        axes[0][column].set_yscale("log")
        axes[1][column].set_ylim(0, 1)
        axes[1][column].set_xlabel("epoch")
    axes[0][0].set_ylabel("training loss")
    axes[1][0].set_ylabel("validation accuracy")
    axes[0][0].legend()
    figure.tight_layout()
    written.append(folder / "learning_curves.png")
    figure.savefig(written[-1], dpi=100)
    plt.close(figure)

    layers = len(histories[0].grad_norms[0]) if histories[0].grad_norms else 0
    figure, axes = plt.subplots(1, len(lrs), figsize=(3.2 * len(lrs), 3.2), squeeze=False)
    for column, lr in enumerate(lrs):
        for h in (h for h in histories if h.lr == lr and h.seed == histories[0].seed):
            for layer in range(layers):
                style = "-" if h.batch_norm else "--"
                name = ["conv1", "conv2", "linear"][layer] if layers == 3 else f"layer {layer + 1}"
                axes[0][column].plot([g[layer] for g in h.grad_norms], style,
                                     label=f"{name}, {'BN' if h.batch_norm else 'none'}")
        axes[0][column].set_title(f"gradient norms, lr {lr:g}")
        axes[0][column].set_yscale("log")
        axes[0][column].set_xlabel("epoch")
    axes[0][0].legend(fontsize=6)
    figure.tight_layout()
    written.append(folder / "gradient_norms.png")
    figure.savefig(written[-1], dpi=100)
    plt.close(figure)
    return written
