"""The crosscoder report: dead latents and explained variance against the decoder's init norm, per sparsity
penalty (seeds 000/001's sweep: dec_init_norm 0.03 .. 1, the "non-detach" runs), from crosscoder_train runs.

The sweep is the runs comparable with the newest one: equal in every param that changes what they measure but
crosscoder.decoder_norm_in_penalty and crosscoder.dec_init_norm, and with every final metric of the table (runs
of an older labpipe lack some), the newest run per (penalty, dec_init_norm); the report says what it left out.
Figure sweep (its data in sweep.csv: one row per run, the final metrics as logged, final_<name>):
  dead latents at the end (%), mean explained variance, and source b's explained variance beside the switching
  baseline's (b predicted from a by the least-squares linear map), each against dec_init_norm, one line per
  penalty.

Observations, one rule each, from the final metrics:
  dead      per penalty, the dec_init_norm that leaves the fewest dead latents, and whether that is a sweet spot
            (fewer than at both ends of the sweep, as the seed found)
  best      the run of highest mean explained variance
  switch    which crosscoders beat the switching baseline on source b (explained_variance_b above the linear
            map's, the metric beats_switch_linear), or, when none does, the closest
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from labpipe.plotting import pyplot
from labpipe.report import runs as read
from labpipe.report.document import Findings, Table, figure
from labpipe.report.grok import plural

STAGES = ("crosscoder_train",)
TITLE = "Sparse crosscoders: the decoder-init sweep"
SWEEP = ("sweep-crosscoder", {"crosscoder.decoder_norm_in_penalty": "PENALTIES", "crosscoder.dec_init_norm": "NORMS"})
SWEPT = ("crosscoder.decoder_norm_in_penalty", "crosscoder.dec_init_norm")
COLUMNS = ("mean_explained_variance", "mean_explained_variance_a", "mean_explained_variance_b",
           "explained_variance_b", "switch_linear_explained_variance_b", "pct_dead_neurons",
           "total_dead_neurons", "l0")


def build(runs: list, labels: dict[str, str], keys: list[str], out: Path) -> Findings:
    table, left_out = sweep_table(runs, labels)
    if table.empty:
        return Findings(["No run has the final metrics of the sweep."], left_out, [])
    results = [plot_sweep(table, out), *left_out,
               Table("runs", "The sweep's runs: final metrics (fractions, as logged)", table)]
    observed = observations(table)
    return Findings(observed[:1], results, observed)


def sweep_table(runs: list, labels: dict[str, str]) -> tuple[pd.DataFrame, list[str]]:
    """One row per (penalty, dec_init_norm), and a sentence per kind of run left out."""
    newest_first = sorted(runs, key=lambda run: run.info.start_time, reverse=True)
    complete = [run for run in newest_first if all(f"final_{name}" in run.data.metrics for name in COLUMNS)]

    def setting(run) -> dict:
        return {k: v for k, v in read.result_params(run).items() if k not in SWEPT}

    rows, other, superseded = {}, [], 0
    for run in complete:
        p = read.params(run)
        point = (p[SWEPT[0]], float(p[SWEPT[1]]))
        if setting(run) != setting(complete[0]):
            other.append(run)
        elif point in rows:
            superseded += 1
        else:
            rows[point] = {"run": labels[run.info.run_id], "run_id": run.info.run_id,
                           "decoder_norm_in_penalty": point[0], "dec_init_norm": point[1],
                           **{f"final_{name}": run.data.metrics[f"final_{name}"] for name in COLUMNS},
                           "final_beats_switch_linear": run.data.metrics.get("final_beats_switch_linear")}
    left_out = []
    if len(complete) < len(runs):
        left_out.append(f"Left out: {plural(len(runs) - len(complete), 'run')} without every final metric of the "
                        "sweep (an older labpipe's).")
    if other:
        differ = sorted({k for run in other for k, v in setting(run).items() if setting(complete[0]).get(k) != v})
        left_out.append(f"Left out: {plural(len(other), 'run')} of another setting than the newest run's (differing "
                        f"in {', '.join(differ)}): select them with --runs to see them.")
    if superseded:
        left_out.append(f"Left out: {plural(superseded, 'older run')} at a (penalty, dec_init_norm) a newer run "
                        "repeats.")
    return pd.DataFrame([rows[point] for point in sorted(rows)]), left_out


def plot_sweep(table: pd.DataFrame, out: Path):
    plt = pyplot()
    drawn, (dead, ev, ev_b) = plt.subplots(1, 3, figsize=(15, 4.2), layout="constrained")
    scale = "log" if (table.dec_init_norm > 0).all() else "linear"
    for penalty, runs in table.groupby("decoder_norm_in_penalty", sort=True):
        dead.plot(runs.dec_init_norm, 100 * runs.final_pct_dead_neurons, marker="o", label=penalty)
        ev.plot(runs.dec_init_norm, runs.final_mean_explained_variance, marker="o", label=penalty)
        ev_b.plot(runs.dec_init_norm, runs.final_explained_variance_b, marker="o", label=penalty)
    ev_b.scatter(table.dec_init_norm, table.final_switch_linear_explained_variance_b, marker="x", color="gray",
                 label="switching baseline (b from a, linear map)")
    dead.set(xscale=scale, xlabel="dec_init_norm", ylabel="dead latents at the end (%)", title="Dead latents")
    ev.set(xscale=scale, xlabel="dec_init_norm", ylabel="mean explained variance (fraction)", title="Reconstruction")
    ev_b.set(xscale=scale, xlabel="dec_init_norm", ylabel="explained variance of source b (fraction)",
             title="Source b vs the switching baseline")
    for axis in (dead, ev, ev_b):
        axis.legend(title="decoder norm in penalty", fontsize=7)
    drawn.suptitle(f"{len(table)} crosscoder_train runs: dec_init_norm x decoder_norm_in_penalty")
    return figure(out, "sweep", "Dead latents, mean explained variance and source b's explained variance against "
                  "dec_init_norm, one line per penalty; crosses: the switching baseline", table, drawn)


def observations(table: pd.DataFrame) -> list[str]:
    said = []
    best = table.loc[table.final_mean_explained_variance.idxmax()]
    said.append(f"Highest mean explained variance: penalty {best.decoder_norm_in_penalty}, dec_init_norm="
                f"{best.dec_init_norm:g}, {best.final_mean_explained_variance:.4g} (dead latents "
                f"{100 * best.final_pct_dead_neurons:.3g} %).")
    for penalty, runs in table.groupby("decoder_norm_in_penalty", sort=True):
        runs = runs.sort_values("dec_init_norm")
        fewest = runs.loc[runs.final_total_dead_neurons.idxmin()]
        text = (f"Penalty {penalty}: dec_init_norm={fewest.dec_init_norm:g} leaves the fewest dead latents, "
                f"{fewest.final_total_dead_neurons:.0f} ({100 * fewest.final_pct_dead_neurons:.3g} %)")
        ends = runs.iloc[[0, -1]]
        if len(runs) > 2 and (fewest.final_total_dead_neurons < ends.final_total_dead_neurons).all():
            text += (f", fewer than at both ends of the sweep ({ends.dec_init_norm.iloc[0]:g}: "
                     f"{ends.final_total_dead_neurons.iloc[0]:.0f}, {ends.dec_init_norm.iloc[1]:g}: "
                     f"{ends.final_total_dead_neurons.iloc[1]:.0f}): a sweet spot")
        said.append(text + ".")
    margin = table.final_explained_variance_b - table.final_switch_linear_explained_variance_b
    beats = table[margin > 0]
    if len(beats) == len(table) > 1:
        low, high = (table.loc[index] for index in (margin.idxmin(), margin.idxmax()))
        said.append(f"All {len(table)} crosscoders beat the switching baseline on source b, by "
                    f"{margin.min():.3g} ({low.decoder_norm_in_penalty} at {low.dec_init_norm:g}) to "
                    f"{margin.max():.3g} ({high.decoder_norm_in_penalty} at {high.dec_init_norm:g}) in explained "
                    "variance.")
    elif len(beats):
        said.append(f"{len(beats)} of {len(table)} crosscoders beat the switching baseline on source b: " + ", ".join(
            f"{r.decoder_norm_in_penalty} at {r.dec_init_norm:g} ({r.final_explained_variance_b:.4g} vs "
            f"{r.final_switch_linear_explained_variance_b:.4g})" for r in beats.itertuples()) + ".")
    else:
        closest = table.loc[margin.idxmax()]
        said.append(f"None of the {len(table)} crosscoders beats the switching baseline on source b; the closest, "
                    f"{closest.decoder_norm_in_penalty} at {closest.dec_init_norm:g}, reaches "
                    f"{closest.final_explained_variance_b:.4g} vs "
                    f"{closest.final_switch_linear_explained_variance_b:.4g}.")
    return said
