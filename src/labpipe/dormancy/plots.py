"""labpipe dormancy-plot results.csv: the lab's three dormancy plots and summary statistics.

    labpipe dormancy-plot results.csv [--save-prefix plots/pythia_] [--no-show] [--threshold 0.1]
                                      [--max-layers-heatmap 20] [--num-layers-evolution 5] [--model NAME]

dormancy_over_steps.png  mean, min and max % dormant across layers vs training step
dormancy_heatmap.png     % dormant per layer (rows) and step (columns)
layer_evolution.png      % dormant vs step for the layers that vary most
One threshold is plotted: --threshold, else 0.1 when the CSV has it, else its largest; and one model: the
CSV's only one, else --model.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pandas as pd

from labpipe.dormancy.results import read_results
from labpipe.errors import InputError

PLOTS = ("dormancy_over_steps.png", "dormancy_heatmap.png", "layer_evolution.png")


def choose_model(results: pd.DataFrame, model: str | None) -> pd.DataFrame:
    """The rows of `model`, or of the CSV's only model: steps of two models on one axis would mean nothing."""
    models = list(dict.fromkeys(results.model))
    if model is None:
        if len(models) > 1:
            raise InputError(f"the CSV holds several models ({', '.join(models)}): choose one with --model")
        return results
    if model not in models:
        raise InputError(f"model {model!r} is not in the CSV; it has {', '.join(models)}")
    return results[results.model == model]


def choose_threshold(results: pd.DataFrame, threshold: float | None) -> float:
    available = sorted(set(results.threshold.astype(float)))
    if threshold is not None:
        if threshold not in available:
            raise InputError(f"threshold {threshold} is not in the CSV; it has {available}")
        return threshold
    return 0.1 if 0.1 in available else available[-1]


def over_steps(results: pd.DataFrame) -> pd.DataFrame:
    """step -> mean, min, max of % dormant across layers."""
    return results.groupby("step").pct_dormant.agg(["mean", "min", "max"])


def heatmap(results: pd.DataFrame, max_layers: int) -> pd.DataFrame:
    """layer_index x step of % dormant, the first max_layers layers."""
    table = results.pivot_table(index="layer_index", columns="step", values="pct_dormant")
    return table.iloc[:max_layers]


def most_variable_layers(results: pd.DataFrame, count: int) -> pd.DataFrame:
    """step x layer_index of % dormant for the `count` layers whose % dormant varies most across steps."""
    table = results.pivot_table(index="step", columns="layer_index", values="pct_dormant")
    spread = table.std().fillna(0).sort_values(ascending=False, kind="stable")
    return table[list(spread.index[:count])]


def summary(results: pd.DataFrame, threshold: float) -> str:
    by_step = over_steps(results)
    lines = [f"threshold {threshold:g}: {results.revision.nunique()} revisions, {results.layer_index.nunique()} layers"]
    for step, row in by_step.iterrows():
        lines.append(f"  step {step:>8}: mean {row['mean']:6.2f}%  min {row['min']:6.2f}%  max {row['max']:6.2f}%")
    first, last = by_step["mean"].iloc[0], by_step["mean"].iloc[-1]
    lines.append(f"  mean % dormant from {first:.2f}% to {last:.2f}% ({last - first:+.2f} points)")
    return "\n".join(lines)


def save_plots(results: pd.DataFrame, prefix: str, threshold: float | None = None, max_layers_heatmap: int = 20,
               num_layers_evolution: int = 5, show: bool = False) -> list[Path]:
    """The three plots of one threshold, saved as prefix + name; returns their paths."""
    import matplotlib

    if not show:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from labpipe.plotting import write_png

    threshold = choose_threshold(results, threshold)
    results = results[results.threshold.astype(float) == threshold]
    paths = [Path(prefix + name) for name in PLOTS]
    model = Path(str(results.model.iloc[0])).name  # a hub name's last part, or lm_train's checkpoints folder
    paths[0].parent.mkdir(parents=True, exist_ok=True)

    figure, axis = plt.subplots(figsize=(7, 4))
    by_step = over_steps(results)
    axis.plot(by_step.index, by_step["mean"], marker="o", label="mean across layers")
    axis.fill_between(by_step.index, by_step["min"], by_step["max"], alpha=0.25, label="min to max")
    axis.set(xlabel="training step", ylabel="% dormant", title=f"Dormant neurons of {model} (tau = {threshold:g})")
    axis.legend()
    figures = [figure]

    table = heatmap(results, max_layers_heatmap)
    figure2, axis = plt.subplots(figsize=(8, 0.4 * len(table) + 2))
    image = axis.imshow(table.to_numpy(), aspect="auto", cmap="viridis")
    axis.set_xticks(range(len(table.columns)), [str(s) for s in table.columns], rotation=45)
    axis.set_yticks(range(len(table.index)), [str(i) for i in table.index])
    axis.set(xlabel="training step", ylabel="layer", title=f"% dormant per layer of {model} (tau = {threshold:g})")
    figure2.colorbar(image, ax=axis, label="% dormant")
    figures.append(figure2)

    figure3, axis = plt.subplots(figsize=(7, 4))
    for layer, series in most_variable_layers(results, num_layers_evolution).items():
        axis.plot(series.index, series.to_numpy(), marker="o", label=f"layer {layer}")
    axis.set(xlabel="training step", ylabel="% dormant",
             title=f"The most variable layers of {model} (tau = {threshold:g})")
    axis.legend()
    figures.append(figure3)
    for fig, path in zip(figures, paths, strict=True):  # written before show(), which empties them on close
        write_png(fig, path)
    if show:
        plt.show()
    for fig in figures:
        plt.close(fig)
    return paths


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="labpipe dormancy-plot", description=__doc__.splitlines()[0])
    parser.add_argument("csv")
    parser.add_argument("--save-prefix", default="", help="prefix of the PNG files, e.g. plots/pythia_")
    parser.add_argument("--no-show", action="store_true", help="only save the plots")
    parser.add_argument("--threshold", type=float)
    parser.add_argument("--max-layers-heatmap", type=int, default=20)
    parser.add_argument("--num-layers-evolution", type=int, default=5)
    parser.add_argument("--model", help="whose rows to plot, when the CSV holds several models")
    args = parser.parse_args(argv)
    try:
        if not Path(args.csv).is_file():
            raise InputError(f"{args.csv}: no such file")
        results = read_results(args.csv)
        if results.empty:
            raise InputError(f"{args.csv} has no rows")
        results = choose_model(results, args.model)
        threshold = choose_threshold(results, args.threshold)
        show = not args.no_show and bool(os.environ.get("DISPLAY"))
        paths = save_plots(results, args.save_prefix, threshold, args.max_layers_heatmap, args.num_layers_evolution,
                           show)
    except ValueError as error:
        print(f"labpipe dormancy-plot: error: {error}", file=sys.stderr)
        return 2
    print(summary(results[results.threshold.astype(float) == threshold], threshold))
    print("saved " + ", ".join(map(str, paths)))
    return 0
