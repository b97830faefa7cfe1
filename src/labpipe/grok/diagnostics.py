"""What the grokking study reads off its curves, computed: train-loss spikes, the grokking epoch, what each
spike and the grokking drop did to the val loss and the weights, and the rule that ends a run once it is over.

All of it is a function of the histories alone (no model), so a run resumed from a checkpoint, or a finished
run read back from its CSV files, gives the same answers.

The grokking epoch. On the validations (epoch e_i, val loss v_i), with W = grok.grokking_window validations
and d = grok.grokking_drop, validation i is a *drop start* when
  - it ends a plateau: over the W validations up to it the val loss fell by less than d/2
    (v_i > (1 - d/2) * v_(i-W)); the run's first W validations, the initial descent, never qualify;
  - a drop follows: within the next W validations the val loss falls below (1 - d) * v_i,
  - and the drop is sustained: it stays below (1 - d) * v_i for the W validations after that (as many as
    the run has).
Drop starts come in runs of consecutive validations (the last ones on the plateau before the same fall);
each run is scored by its largest fall v_i / min(v_(i+1..i+W)), and the grokking epoch is the last drop start
of the best-scoring run: the last validation on the plateau, after which the val loss falls. None when no
validation qualifies.
"""

from __future__ import annotations

import collections
import math


class SpikeDetector:
    """Flags the epoch where a train-loss spike (a Slingshot) begins: the loss exceeds `factor` times
    the lowest loss of the `window` epochs before it, and the epoch before was not already a spike."""

    def __init__(self, factor: float, window: int):
        self.factor = factor
        self.recent: collections.deque[float] = collections.deque(maxlen=window)
        self.spiking = False

    def state_dict(self) -> dict:
        return {"recent": list(self.recent), "spiking": self.spiking}

    def load_state_dict(self, state: dict) -> None:
        self.recent.clear()
        self.recent.extend(state["recent"])
        self.spiking = state["spiking"]

    def update(self, loss: float) -> bool:
        spiking = bool(self.recent) and loss > self.factor * min(self.recent)
        started = spiking and not self.spiking
        self.spiking = spiking
        self.recent.append(loss)
        return started


def grokking_index(val_losses: list[float], window: int, drop: float) -> int | None:
    """The index of the grokking validation in `val_losses` (module docstring), or None."""
    v, w = val_losses, window
    runs: list[list[int]] = []
    for i in range(w, len(v) - 1):
        after = v[i + 1 : i + 1 + w]
        fallen = [j for j, loss in enumerate(after, start=i + 1) if loss < (1 - drop) * v[i]]
        if not (v[i] > (1 - drop / 2) * v[i - w] and fallen):
            continue
        sustained = v[fallen[0] : fallen[0] + w + 1]
        if max(sustained) >= (1 - drop) * v[i]:
            continue
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    if not runs:
        return None

    def score(run: list[int]) -> float:
        return max(v[i] / min(v[i + 1 : i + 1 + w]) for i in run)

    return max(runs, key=score)[-1]  # max keeps the first of equal scores: the earliest such drop


def grokking(val_history: list[dict], train_history: list[dict], window: int, drop: float) -> dict | None:
    """The grokking epoch and what happened over its drop (the W validations after it): the val loss before
    and after, and the change of the train loss and of the total weight norm over the same epochs."""
    index = grokking_index([r["val_loss"] for r in val_history], window, drop)
    if index is None:
        return None
    start, end = val_history[index], val_history[min(index + window, len(val_history) - 1)]
    by_epoch = {r["epoch"]: r for r in train_history}
    before, after = by_epoch[start["epoch"]], by_epoch[end["epoch"]]
    return {
        "epoch": start["epoch"],
        "drop_end_epoch": end["epoch"],
        "val_loss_before": start["val_loss"],
        "val_loss_after": end["val_loss"],
        "train_loss_change": after["train_loss"] - before["train_loss"],
        "weight_norm_change": after["weight_norm"] - before["weight_norm"],
    }


def spike_effects(spikes: list[int], train_history: list[dict], val_history: list[dict], window: int) -> list[dict]:
    """Per train-loss spike at epoch s: the change of the val loss from the last validation before s to the
    first at or after s + window (None when the run has none), and of the total weight norm from epoch s - 1
    to s + window (or the run's last epoch)."""
    by_epoch = {r["epoch"]: r for r in train_history}
    last_epoch = train_history[-1]["epoch"]
    effects = []
    for s in spikes:
        before = [r["val_loss"] for r in val_history if r["epoch"] < s]
        after = [r["val_loss"] for r in val_history if r["epoch"] >= s + window]
        start = by_epoch.get(s - 1, by_epoch[s])
        end = by_epoch[min(s + window, last_epoch)]
        effects.append({
            "epoch": s,
            "train_loss": by_epoch[s]["train_loss"],
            "val_loss_change": after[0] - before[-1] if before and after else None,
            "weight_norm_change": end["weight_norm"] - start["weight_norm"],
        })
    return effects


def plateau_stop(val_history: list[dict], window: int, drop: float, patience: int) -> str | None:
    """grok.stop_after_plateau: why the run should stop now (the val loss has not improved for `patience`
    validations since the grokking epoch), or None."""
    losses = [r["val_loss"] for r in val_history]
    index = grokking_index(losses, window, drop)
    if index is None:
        return None
    since = losses[index:]
    best = min(range(len(since)), key=since.__getitem__)
    if len(since) - 1 - best < patience:
        return None
    return (f"no val improvement for {patience} validations after grokking at epoch "
            f"{val_history[index]['epoch']} (best {since[best]:.4g} at epoch {val_history[index + best]['epoch']})")


def correlation(xs: list[float], ys: list[float]) -> float | None:
    """Pearson's r, None when either side is constant or there are fewer than 2 points."""
    pairs = [(x, y) for x, y in zip(xs, ys, strict=True) if math.isfinite(x) and math.isfinite(y)]
    if len(pairs) < 2:
        return None
    mx = sum(x for x, _ in pairs) / len(pairs)
    my = sum(y for _, y in pairs) / len(pairs)
    sxy = sum((x - mx) * (y - my) for x, y in pairs)
    sxx = sum((x - mx) ** 2 for x, _ in pairs)
    syy = sum((y - my) ** 2 for _, y in pairs)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else None
