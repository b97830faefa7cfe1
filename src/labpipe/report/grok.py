"""The m-height / grokking report: grok_train runs side by side (seed 004's weight-decay sweep).

Figures (each one's data in <name>.csv):
  curves   val and train log2-MSE of every run against the epoch, both axes log scale; each run's grokking
           epoch a solid vertical line, its train-loss spikes dotted ones, in its colour
  norms    total weight norm and update ratio |dθ|/|θ| per epoch, the same markers
  groups   each run's val log2-MSE per (n, k, m) group at its best epoch
Table runs: weight decay, model, best val log2-MSE and its epoch, test log2-MSE (at that epoch), grokking epoch,
spikes, epochs run, why it stopped, wall time.

Observations, one rule each, from the logged metrics:
  best      the run of lowest val loss: the value, its epoch, the test loss there
  drop      per run, the largest relative fall of the val loss between two consecutive validations (at least
            10 %), the first grok.grokking_window validations left out as grok/diagnostics.py does (the initial
            descent), and the relative change of the train loss between the same two epochs (the seed's "train
            loss rose as val fell")
  grokking  per run, the grokking epoch grok_train detected (grok/diagnostics.py) and the val loss there
  spikes    per run, the epochs of its train-loss spikes (metric `slingshot`) and the val-loss change over the
            spike_window epochs after each (metric spike/val_loss_change)
  overfit   per run whose val loss ended at least 10 % above its best: by how much
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from labpipe.plotting import pyplot
from labpipe.report import runs as read
from labpipe.report.document import Findings, Table, figure

STAGES = ("grok_train",)
TITLE = "m-height regressor and grokking"
SWEEP = ("sweep-grok", {"grok.weight_decay": "WDS", "grok.output_head": "HEADS"})
DROP = 0.1  # a fall of the val loss between two validations worth saying: 10 %
OVERFIT = 1.1  # a final val loss this many times the best is worth saying


def build(runs: list, labels: dict[str, str], keys: list[str], out: Path) -> Findings:
    groups = sorted({key for run in runs for key in run.data.metrics if key.startswith("val_loss/")})
    curves = read.histories([(run, metric) for run in runs for metric in
                             ("train_loss", "val_loss", "weight_norm", "update_ratio", "slingshot",
                              "spike/val_loss_change", *(g for g in groups if g in run.data.metrics))])
    rows = [summarize(run, labels[run.info.run_id], curves) for run in runs]
    table = pd.DataFrame(rows).astype({"best_epoch": "Int64", "grokking_epoch": "Int64"})
    by = f" by {', '.join(map(read.short, keys))}" if keys else ""
    drawn = [plot_curves(runs, labels, curves, table, out, ("val_loss", "train_loss"), "curves", f"Loss{by}"),
             plot_curves(runs, labels, curves, table, out, ("weight_norm", "update_ratio"), "norms", f"Norms{by}"),
             plot_groups(runs, labels, curves, table, groups, out, by) if groups else None]
    results = [*filter(None, drawn),  # a run of an older labpipe may lack a figure's metrics
               Table("runs", "grok_train runs: the best epoch by val log2-MSE, the test log2-MSE there", table)]
    observed = observations(runs, table, curves)
    grokked = f"{table.grokking_epoch.notna().sum()} of {len(table)} runs grokked."
    return Findings([*observed[:1], grokked], results, observed)


def summarize(run, label: str, curves: dict) -> dict:
    p, run_id = read.params(run), run.info.run_id
    val = curves[run_id, "val_loss"]
    spikes = curves[run_id, "slingshot"].index.tolist()
    best_epoch = int(val.idxmin()) if len(val) else None  # idxmin: the first of equal minima, as offer_best
    grokking = run.data.metrics.get("grokking_epoch")
    return {"run": label, "run_id": run_id, "weight_decay": p.get("grok.weight_decay"),
            "model": f"{p.get('grok.model')} {p.get('grok.width')}x{p.get('grok.blocks')}",
            "best_val_loss": val.min() if len(val) else None, "best_epoch": best_epoch,
            "test_loss": run.data.metrics.get("test_loss"),
            "grokking_epoch": None if grokking is None else int(grokking),
            "spikes": len(spikes), "spike_epochs": ";".join(map(str, spikes)),
            "epochs_run": run.data.tags.get("epochs_run"), "stop_reason": run.data.tags.get("stop_reason"),
            "seconds": read.seconds(run)}


AXES = {"val_loss": "val log2-MSE (bits²)", "train_loss": "train log2-MSE (bits²)",
        "weight_norm": "total weight norm |θ| (L2)", "update_ratio": "update ratio |dθ|/|θ| per epoch"}


def plot_curves(runs, labels, curves, table, out, metrics, name, what):
    """The metrics' curves, one axis each (those no run logged left out; None when that is all of them)."""
    metrics = [metric for metric in metrics if any(len(curves[run.info.run_id, metric]) for run in runs)]
    if not metrics:
        return None
    plt = pyplot()
    drawn, axes = plt.subplots(len(metrics), 1, figsize=(9, 3.6 * len(metrics)), sharex=True, squeeze=False,
                               layout="constrained")
    axes = axes[:, 0]
    points = []
    for run, (_, row), color in zip(runs, table.iterrows(), colors(len(runs)), strict=True):
        for axis, metric in zip(axes, metrics, strict=True):
            series = curves[run.info.run_id, metric]
            axis.plot(series.index, series.to_numpy(), color=color, label=labels[run.info.run_id], linewidth=1.2)
            points += [{"run_id": run.info.run_id, "run": row.run, "metric": metric, "epoch": int(step),
                        "value": v} for step, v in series.items()]
            if pd.notna(row.grokking_epoch):
                axis.axvline(row.grokking_epoch, color=color, linewidth=2, alpha=0.7)
            for epoch in curves[run.info.run_id, "slingshot"].index:
                axis.axvline(epoch, color=color, linestyle=":", alpha=0.5)
    for axis, metric in zip(axes, metrics, strict=True):
        axis.set(xscale="log", yscale="log", ylabel=AXES[metric])
        axis.legend(fontsize=7)
    axes[-1].set_xlabel("epoch (log scale)")
    drawn.suptitle(f"{what}: {len(runs)} grok_train runs (solid vertical: grokking epoch; dotted: train-loss spike)",
                   fontsize=10)
    caption = f"{what}: {', '.join(metrics)} per epoch of every run, grokking epochs and spikes marked"
    return figure(out, name, caption, pd.DataFrame(points), drawn)


def plot_groups(runs, labels, curves, table, groups, out, by):
    plt = pyplot()
    drawn, axis = plt.subplots(figsize=(max(8, 0.5 * len(groups) * max(1, len(runs) / 2)), 4.5), layout="constrained")
    width = 0.8 / len(runs)
    points = []
    for i, (run, (_, row), color) in enumerate(zip(runs, table.iterrows(), colors(len(runs)), strict=True)):
        at_best = [curves[run.info.run_id, g].get(row.best_epoch) if (run.info.run_id, g) in curves else None
                   for g in groups]
        axis.bar([j + i * width for j in range(len(groups))], [v if v is not None else 0 for v in at_best],
                 width, color=color, label=labels[run.info.run_id])
        points += [{"run_id": run.info.run_id, "run": row.run, "group": g.removeprefix("val_loss/"),
                    "epoch": row.best_epoch, "val_loss": v} for g, v in zip(groups, at_best, strict=True)]
    axis.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))],
                    [g.removeprefix("val_loss/") for g in groups], rotation=60, fontsize=7)
    axis.set(xlabel="(n, k, m) group", ylabel="val log2-MSE at the best epoch (bits²)",
             title=f"Val log2-MSE per group at each run's best epoch{by}")
    axis.legend(fontsize=7)
    return figure(out, "groups", "Each run's val log2-MSE per (n, k, m) group at its best epoch",
                  pd.DataFrame(points), drawn)


def colors(n: int) -> list:
    cmap = pyplot().get_cmap("tab10" if n <= 10 else "viridis")
    return [cmap(i if n <= 10 else i / max(1, n - 1)) for i in range(n)]


def observations(runs: list, table: pd.DataFrame, curves: dict) -> list[str]:
    said = []
    if table.best_val_loss.notna().any():
        best = table.loc[table.best_val_loss.idxmin()]
        said.append(f"Lowest val log2-MSE: {best.run}, {best.best_val_loss:.4g} at epoch {best.best_epoch}"
                    + (f" (test {best.test_loss:.4g} at that epoch)." if pd.notna(best.test_loss) else "."))
    for run, (_, row) in zip(runs, table.iterrows(), strict=True):
        val, train = curves[run.info.run_id, "val_loss"], curves[run.info.run_id, "train_loss"]
        skip = int(read.value(read.params(run).get("grok.grokking_window", "5")))
        falls = val.pct_change().iloc[skip + 1:]  # from validation i - 1 to i, for i - 1 past the first `skip`
        if len(falls) and falls.min() <= -DROP:
            end = falls.idxmin()
            start = val.index[val.index.get_loc(end) - 1]
            text = (f"{row.run}: the val loss fell {-100 * falls[end]:.3g} %, from {val[start]:.4g} to "
                    f"{val[end]:.4g}, between epochs {start} and {end}: its largest fall between two validations "
                    f"after the first {skip}")
            if start in train.index and end in train.index and train[start] > 0:
                change = 100 * (train[end] - train[start]) / train[start]
                text += (f"; the train loss {'rose' if change > 0 else 'fell'} {abs(change):.3g} % over the same "
                         f"epochs ({train[start]:.4g} to {train[end]:.4g})")
            said.append(text + ".")
        if pd.notna(row.grokking_epoch):
            epoch = int(row.grokking_epoch)
            there = f" (val {val[epoch]:.4g} there)" if epoch in val.index else ""
            said.append(f"{row.run}: grokking at epoch {epoch}{there}, by grok_train's rule (grok/diagnostics.py).")
        else:
            said.append(f"{row.run}: no grokking epoch (grok_train's rule found no sustained drop after a plateau).")
        spikes = curves[run.info.run_id, "slingshot"].index.tolist()
        if spikes:
            changes = curves[run.info.run_id, "spike/val_loss_change"]
            window = read.params(run).get("grok.spike_window")
            effects = ", ".join(f"{changes[s]:+.3g}" if s in changes.index else "n/a" for s in spikes)
            said.append(f"{row.run}: {plural(len(spikes), 'train-loss spike')} (Slingshot) at epoch"
                        f"{'s' * (len(spikes) > 1)} {', '.join(map(str, spikes))}; the val loss changed by {effects} "
                        f"over the {window} epochs after {'each' if len(spikes) > 1 else 'it'}.")
        if len(val) and val.iloc[-1] >= OVERFIT * val.min():
            said.append(f"{row.run}: the val loss ended {100 * (val.iloc[-1] / val.min() - 1):.3g} % above its "
                        f"best ({val.iloc[-1]:.4g} at epoch {val.index[-1]} vs {val.min():.4g} at epoch "
                        f"{row.best_epoch}).")
    return said


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'s' * (count != 1)}"
