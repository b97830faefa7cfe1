"""The HMM report: hmm_train runs over their swept params, each against its hmm_eval baselines (seed 002).

Every hmm_train run is read at its best epoch, the one of highest held-out log-likelihood per token (the HMM it
saved, the one hmm_eval evaluates), and paired with the newest hmm_eval run of its DVC experiment and params
(select.pair). Figures (each one's data in <name>.csv):
  sweep      final-token CE (test_final_ce) and held-out log-likelihood per token over the params that vary
             between the runs: a heatmap over two of them (the two with most values; one heatmap per setting
             of any others, sweep_<setting>), a line plot over one; none when no param varies
  learning   held-out log-likelihood and final-token CE per epoch of every run, its hmm_eval baselines
             (uniform, unigram, bigram: final_ce/overall/<baseline>) as horizontal lines in its colour
  unique     final-token CE on the full and on the deduplicated ("unique") test set at the best epoch
Table runs: the swept params, the best epoch and its metrics, the paired hmm_eval run's CEs, wall time.

Observations, one rule each, from the logged metrics:
  best       the run of lowest final-token CE (per vocabulary size when K varies: CEs over other vocabularies
             do not compare), with its epoch and held-out log-likelihood
  effect     per varying param and setting of the others, the CE at its lowest and at its highest value
  baselines  per hmm_eval run, the baselines its HMM beats (lower final_ce/overall/<strategy>) and the margin to
             the best baseline
  unique     the unique test set's CE minus the full set's, over the runs: its range, and in how many it is higher
  converged  per run whose best epoch is its last: the held-out log-likelihood still rose there
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from labpipe.plotting import pyplot
from labpipe.report import runs as read
from labpipe.report.document import Findings, Table, figure
from labpipe.report.grok import colors
from labpipe.report.select import pair

STAGES = ("hmm_train", "hmm_eval")
TITLE = "HMMs fitted by minibatch EM"
SWEEP = ("sweep-hmm", {"hmm.hidden_states": "HS", "hmm.vocab_size": "KS"})
STRATEGIES = ("hmm", "uniform", "unigram", "bigram")
BASELINES = STRATEGIES[1:]
STYLES = {"uniform": "-.", "unigram": ":", "bigram": "--"}
CURVES = ("heldout_ll_per_token", "test_final_ce", "test_unique_final_ce")
AXES = {"test_final_ce": "final-token CE (nats)", "heldout_ll_per_token": "held-out log-likelihood (nats/token)"}


def build(runs: list, labels: dict[str, str], keys: list[str], out: Path) -> Findings:
    trains = [run for run in runs if read.stage(run) == "hmm_train"]
    pairs = pair(trains, [run for run in runs if read.stage(run) == "hmm_eval"])
    curves = read.histories((train, metric) for train in trains for metric in CURVES)
    swept = read.differing(trains)
    table = pd.DataFrame([row(train, evaluation, labels, curves, swept) for train, evaluation in pairs])
    table = table.astype({"best_epoch": "Int64", "last_epoch": "Int64"})
    trained = table[table.best_epoch.notna()]
    results = []
    if len(trained):
        results += [*sweep_figures(trained, swept, out),
                    plot_learning(pairs, labels, curves, out), plot_unique(trained, out)]
    results.append(Table("runs", "hmm_train runs at their best epoch, with their hmm_eval final-token CEs (nats)",
                         table))
    observed = observations(pairs, table, trained, swept, curves)
    return Findings(observed[:1], results, observed)


def row(train, evaluation, labels: dict[str, str], curves: dict, swept: list[str]) -> dict:
    shown = train or evaluation
    found = {"run": labels[shown.info.run_id], "run_id": train.info.run_id if train else None,
             **{key: read.params(shown).get(key) for key in swept}, "best_epoch": None, "last_epoch": None}
    if train is not None:
        heldout = curves[train.info.run_id, "heldout_ll_per_token"]
        if len(heldout):
            best = heldout.idxmax()  # the first of equal maxima, as offer_best keeps it
            found.update({"best_epoch": int(best), "last_epoch": int(heldout.index[-1]),
                          **{metric: curves[train.info.run_id, metric].get(best) for metric in CURVES},
                          "seconds": read.seconds(train)})
    found["eval_run_id"] = evaluation.info.run_id if evaluation else None
    for strategy in STRATEGIES:
        found[f"eval_{strategy}"] = evaluation.data.metrics.get(f"final_ce/overall/{strategy}") if evaluation else None
    return found


def ordered(values) -> list[str]:
    return sorted(set(values), key=read.sort_key)


def sweep_figures(table: pd.DataFrame, swept: list[str], out: Path) -> list:
    """A line plot over the one varying param, or heatmaps over the two with most values."""
    if not swept:
        return []
    axes = sorted(swept, key=lambda key: -table[key].nunique())  # stable: ties keep differing()'s order
    if len(axes) == 1:
        return [plot_line(table, axes[0], out)]
    rows, cols, facets = axes[0], axes[1], axes[2:]
    groups = table.groupby(facets, sort=False) if facets else [((), table)]
    figures = []
    for setting, cells in groups:
        setting = setting if isinstance(setting, tuple) else (setting,)
        named = ", ".join(f"{read.short(k)}={v}" for k, v in zip(facets, setting, strict=True))
        suffix = "".join(f"_{read.short(k)}{v}" for k, v in zip(facets, setting, strict=True))
        figures.append(plot_heatmap(cells, rows, cols, f"sweep{suffix}", named, out))
    return figures


def plot_heatmap(cells: pd.DataFrame, rows: str, cols: str, name: str, setting: str, out: Path):
    plt = pyplot()
    row_values, col_values = ordered(cells[rows]), ordered(cells[cols])
    drawn, panels = plt.subplots(1, 2, figsize=(5 + 1.2 * len(col_values), 1.5 + 0.8 * len(row_values)),
                                 layout="constrained")
    newest = cells.drop_duplicates([rows, cols], keep="last")  # runs in start order: a rerun replaces its cell
    points = []
    for panel, metric in zip(panels, ("test_final_ce", "heldout_ll_per_token"), strict=True):
        grid = np.full((len(row_values), len(col_values)), np.nan)
        for _, cell in newest.iterrows():
            i, j = row_values.index(cell[rows]), col_values.index(cell[cols])
            grid[i, j] = cell[metric]
            points.append({rows: cell[rows], cols: cell[cols], "metric": metric, "value": cell[metric],
                           "run_id": cell.run_id})
        image = panel.imshow(grid, cmap="viridis_r" if metric == "test_final_ce" else "viridis", aspect="auto")
        for (i, j), v in np.ndenumerate(grid):
            if not np.isnan(v):  # dark text on the light cells, light on the dark ones
                r, g, b, _ = image.cmap(image.norm(v))
                panel.text(j, i, f"{v:.4g}", ha="center", va="center", fontsize=8,
                           color="black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white")
        panel.set_xticks(range(len(col_values)), col_values)
        panel.set_yticks(range(len(row_values)), row_values)
        panel.set(xlabel=read.short(cols), ylabel=read.short(rows), title=AXES[metric])
        drawn.colorbar(image, ax=panel, label=AXES[metric])
    where = f" at {setting}" if setting else ""
    drawn.suptitle(f"hmm_train runs over {read.short(rows)} x {read.short(cols)}{where}, at each run's best epoch")
    caption = (f"Final-token CE and held-out log-likelihood over {read.short(rows)} x {read.short(cols)}{where} "
               "(the newest run per cell)")
    return figure(out, name, caption, pd.DataFrame(points), drawn)


def plot_line(table: pd.DataFrame, key: str, out: Path):
    plt = pyplot()
    values = ordered(table[key])
    numeric = all(read.sort_key(v)[0] == 0 for v in values)
    drawn, panels = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    points = []
    for panel, metrics in zip(panels, (("test_final_ce", "test_unique_final_ce"), ("heldout_ll_per_token",)),
                              strict=True):
        for metric in metrics:
            at = table.drop_duplicates(key, keep="last").set_index(key)[metric].reindex(values)
            x = [read.value(v) for v in values] if numeric else list(range(len(values)))
            panel.plot(x, at.to_numpy(), marker="o", label={"test_final_ce": "full test set",
                                                             "test_unique_final_ce": "unique test set"}.get(metric))
            points += [{key: v, "metric": metric, "value": at[v]} for v in values]
        if not numeric:
            panel.set_xticks(range(len(values)), values)
        panel.set(xlabel=read.short(key), ylabel=AXES[metrics[0]], title=AXES[metrics[0]])
        if len(metrics) > 1:
            panel.legend()
    drawn.suptitle(f"hmm_train runs over {read.short(key)}, at each run's best epoch")
    return figure(out, "sweep", f"Final-token CE and held-out log-likelihood against {read.short(key)}",
                  pd.DataFrame(points), drawn)


def plot_learning(pairs: list, labels: dict[str, str], curves: dict, out: Path):
    plt = pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    drawn, panels = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    trained = [(train, evaluation) for train, evaluation in pairs if train is not None]
    points = []
    for (train, evaluation), color in zip(trained, colors(len(trained)), strict=True):
        label = labels[train.info.run_id]
        for panel, metric in zip(panels, ("heldout_ll_per_token", "test_final_ce"), strict=True):
            series = curves[train.info.run_id, metric]
            panel.plot(series.index, series.to_numpy(), marker="o", markersize=3, color=color, label=label)
            points += [{"run_id": train.info.run_id, "run": label, "metric": metric, "epoch": int(e), "value": v}
                       for e, v in series.items()]
        for baseline in BASELINES if evaluation is not None else ():
            level = evaluation.data.metrics.get(f"final_ce/overall/{baseline}")
            if level is not None:
                panels[1].axhline(level, color=color, linestyle=STYLES[baseline], linewidth=1)
                points.append({"run_id": train.info.run_id, "run": label, "metric": f"final_ce/overall/{baseline}",
                               "epoch": None, "value": level})
    for panel in panels:
        panel.xaxis.set_major_locator(MaxNLocator(integer=True))
    panels[0].set(xlabel="epoch", ylabel=AXES["heldout_ll_per_token"], title="Held-out log-likelihood")
    panels[1].set(xlabel="epoch", ylabel=AXES["test_final_ce"], title="Final-token CE (lines: hmm_eval baselines)")
    panels[0].legend(fontsize=7)
    proxies = [Line2D([], [], color="gray", linestyle=STYLES[b], label=f"{b} (hmm_eval)") for b in BASELINES]
    panels[1].legend(handles=panels[1].get_legend_handles_labels()[0] + proxies, fontsize=7)
    drawn.suptitle(f"Learning curves of {len(trained)} hmm_train runs")
    return figure(out, "learning", "Held-out log-likelihood and final-token CE per epoch; each run's hmm_eval "
                  "baselines as lines in its colour", pd.DataFrame(points), drawn)


def plot_unique(table: pd.DataFrame, out: Path):
    plt = pyplot()
    drawn, axis = plt.subplots(figsize=(max(6, 1.1 * len(table)), 4), layout="constrained")
    x = np.arange(len(table))
    axis.bar(x - 0.2, table.test_final_ce, 0.4, label="full test set")
    axis.bar(x + 0.2, table.test_unique_final_ce, 0.4, label="unique test set")
    axis.set_xticks(x, table.run, rotation=30, ha="right", fontsize=7)
    axis.set(xlabel="run", ylabel="final-token CE at the best epoch (nats)", title="Full vs unique test set")
    axis.legend()
    data = table.melt(id_vars=["run_id", "run", "best_epoch"], value_vars=["test_final_ce", "test_unique_final_ce"],
                      var_name="metric", value_name="value")
    return figure(out, "unique", "Final-token CE on the full and the deduplicated test set, at the best epoch",
                  data, drawn)


def observations(pairs: list, table: pd.DataFrame, trained: pd.DataFrame, swept: list[str], curves: dict) -> list:
    said = []
    by_vocabulary = "hmm.vocab_size" in swept
    for vocabulary, runs in trained.groupby("hmm.vocab_size") if by_vocabulary else [(None, trained)]:
        best = runs.loc[runs.test_final_ce.idxmin()]
        said.append(f"Lowest final-token CE{f' at vocab_size={vocabulary}' if by_vocabulary else ''}: {best.run}, "
                    f"{best.test_final_ce:.4g} nats at epoch {best.best_epoch} (held-out log-likelihood "
                    f"{best.heldout_ll_per_token:.4g} nats per token).")
    for key in swept:
        others = [k for k in swept if k != key]
        for setting, runs in trained.groupby(others, sort=False) if others else [((), trained)]:
            runs = runs.drop_duplicates(key, keep="last")
            if len(runs) < 2:
                continue
            setting = setting if isinstance(setting, tuple) else (setting,)
            at = ", ".join(f"{read.short(k)}={v}" for k, v in zip(others, setting, strict=True))
            low, high = (runs.set_index(key).loc[v] for v in (ordered(runs[key])[0], ordered(runs[key])[-1]))
            said.append(f"{read.short(key)} {low.name} -> {high.name}{f' at {at}' if at else ''}: final-token CE "
                        f"{low.test_final_ce:.4g} -> {high.test_final_ce:.4g} nats "
                        f"({high.test_final_ce - low.test_final_ce:+.3g}).")
    for _, run in table[table.eval_run_id.notna()].iterrows():
        hmm = run.eval_hmm
        levels = {b: run[f"eval_{b}"] for b in BASELINES if pd.notna(run[f"eval_{b}"])}
        beaten = [b for b, v in levels.items() if hmm < v]
        closest = min(levels, key=levels.get)
        text = f"{run.run}: the HMM's final-token CE (hmm_eval) is {hmm:.4g} nats; it beats " + (
            ", ".join(f"{b} ({levels[b]:.4g})" for b in beaten) or "no baseline")
        if len(beaten) < len(levels):
            text += "; not " + ", ".join(f"{b} ({levels[b]:.4g})" for b in levels if b not in beaten)
        said.append(text + f"; margin to the best baseline, {closest}: {levels[closest] - hmm:+.3g} nats.")
    if not len(trained):
        return said
    gap = trained.test_unique_final_ce - trained.test_final_ce
    said.append(f"The unique test set's final-token CE minus the full set's ranges from {gap.min():+.3g} to "
                f"{gap.max():+.3g} nats at the best epoch; it is higher in {(gap > 0).sum()} of {len(gap)} runs.")
    for _, run in trained[(trained.best_epoch == trained.last_epoch) & (trained.last_epoch > 1)].iterrows():
        heldout = curves[run.run_id, "heldout_ll_per_token"]
        said.append(f"{run.run}: the held-out log-likelihood still rose at the last epoch ({run.last_epoch}: "
                    f"{heldout.iloc[-2]:.4g} -> {heldout.iloc[-1]:.4g} nats per token): more epochs may help.")
    return said
