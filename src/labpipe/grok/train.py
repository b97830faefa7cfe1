"""Stage grok_train: long AdamW training of an m-height regressor, watching weight norms for grokking.

Reads the balanced subsamples of stage mheight_subsample; writes artifacts/grok/{model.pt,
metrics.json, train_history.csv, val_history.csv, plots/}. The run lifecycle (resume, extend, init_from,
checkpoints, champion) is labpipe.run's: a killed run restarts from the newest checkpoint and ends with the
same weights as an uninterrupted one; raising grok.epochs continues a finished run. The learning rate is
constant, so a run of 2N epochs is a run of N extended by N.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from labpipe.config import GrokParams, Params, flatten
from labpipe.device import resolve_device
from labpipe.errors import InputError
from labpipe.files import save_torch, write_json
from labpipe.grok.features import FeatureLayout, Split, encode, make_layout, place
from labpipe.grok.models import build_model, log2_loss
from labpipe.mheight.data import TRAIN, VAL, read_dataset
from labpipe.run import TrainingRun, TrainState, load_into

# ----------------------------------------------------------------------------- diagnostics


def weight_norms(model: torch.nn.Module) -> dict[str, float]:
    """L2 norm of every weight matrix (per layer) and of all parameters together."""
    norms = {f"weight_norm/{name}": p.detach().norm().item() for name, p in model.named_parameters() if p.dim() >= 2}
    norms["weight_norm"] = torch.sqrt(sum(p.detach().pow(2).sum() for p in model.parameters())).item()
    return norms


def flat_parameters(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


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


@torch.no_grad()
def evaluate(model: torch.nn.Module, split: Split, n_groups: int, device: torch.device, batch: int = 65536):
    """Mean loss over the split and per group."""
    model.eval()
    total = torch.zeros(n_groups, dtype=torch.float64, device=device)
    count = torch.zeros(n_groups, dtype=torch.float64, device=device)
    for start in range(0, len(split.log2_h), batch):
        x = split.x[start : start + batch].to(device)
        group = split.group[start : start + batch].to(device)
        z, _aux = model(x, x[:, -n_groups:])
        loss = log2_loss(z, split.log2_h[start : start + batch].to(device)).double()
        total.index_add_(0, group, loss)
        count.index_add_(0, group, torch.ones_like(loss))
    model.train()
    per_group = (total / count.clamp(min=1)).tolist()
    return (total.sum() / count.sum()).item(), per_group


# ----------------------------------------------------------------------------- training


def group_name(group: tuple[int, int, int]) -> str:
    n, k, m = group
    return f"n{n}_k{k}_m{m}"


def run_train(params: Params) -> None:
    """Stage grok_train."""
    g = params.grok
    device = resolve_device(g.device, "grok.device")
    train_frame = read_dataset(TRAIN)
    layout = make_layout(train_frame)
    train, val = encode(train_frame, layout), encode(read_dataset(VAL), layout)
    n_groups = len(layout.groups)
    train, val = place(train, device), place(val, device)

    torch.manual_seed(g.seed)
    model = build_model(g, layout.dim, n_groups).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=g.lr, weight_decay=g.weight_decay)
    shuffle = torch.Generator().manual_seed(g.seed)  # CPU generator: its state is saved and restored exactly
    spikes = SpikeDetector(g.spike_factor, g.spike_window)
    parts = {"model": model, "optimizer": optimizer, "shuffle": shuffle, "spikes": spikes}

    with TrainingRun("grok_train", params, [TRAIN, VAL], parts, init=lambda loaded: init_weights(model, g, loaded)) \
            as run:
        extra = run.state.extra
        extra.setdefault("val_history", [])
        extra.setdefault("spikes", [])
        run.set_tags({"device": str(device), "train_rows": len(train.log2_h), "val_rows": len(val.log2_h)})
        run.log({"excluded_infinite_train": train.excluded_infinite,
                 "excluded_infinite_val": val.excluded_infinite}, step=0)

        def validate(epoch: int) -> dict[str, float]:
            val_loss, per_group = evaluate(model, val, n_groups, device)
            by_group = {group_name(gr): v for gr, v in zip(layout.groups, per_group, strict=True)}
            extra["val_history"].append({"epoch": epoch, "val_loss": val_loss, **by_group})
            run.offer_best(val_loss, model, epoch)
            return {"val_loss": val_loss, **{f"val_loss/{name}": v for name, v in by_group.items()}}

        for epoch in run.steps("grok epochs"):
            started = time.perf_counter()
            before = flat_parameters(model)
            train_loss, grad_norm = train_epoch(model, optimizer, train, g, n_groups, shuffle, device)
            after = flat_parameters(model)
            record = {
                "epoch": epoch,
                "train_loss": train_loss,
                "grad_norm": grad_norm,
                "update_ratio": ((after - before).norm() / before.norm()).item(),
                "lr": optimizer.param_groups[0]["lr"],
                **weight_norms(model),
            }
            run.state.history.append(record)
            metrics = {k: v for k, v in record.items() if k != "epoch"}
            metrics["epoch_seconds"] = time.perf_counter() - started
            if spikes.update(train_loss):
                extra["spikes"].append(epoch)
                metrics["slingshot"] = 1.0
                tqdm.write(f"epoch {epoch}: train-loss spike (Slingshot) to {train_loss:.4g}")
            if epoch % g.val_every == 0:
                metrics.update(validate(epoch))
                run.bar.set_postfix(train=f"{train_loss:.4f}", val=f"{metrics['val_loss']:.4f}")
            run.log(metrics, step=epoch)
        if not extra["val_history"] or extra["val_history"][-1]["epoch"] != run.state.step:
            run.log(validate(run.state.step), step=run.state.step)  # the run ends off the cadence (run.py)

        with run.outputs() as out:
            metrics = write_outputs(out, run.state, layout, g)
        model.load_state_dict(run.state.best.weights)
        run.finish(model, metrics)


def init_weights(model: torch.nn.Module, g: GrokParams, loaded: list[dict]) -> None:
    """grok.init_from: the whole model's weights; grok.init_experts_from: one ResNet's weights per expert."""
    if g.init_experts_from:
        for index, (expert, weights) in enumerate(zip(model.experts, loaded, strict=True)):
            load_into(expert, weights, f"grok.init_experts_from[{index}]={g.init_experts_from[index]}")
    else:
        load_into(model, loaded[0], f"grok.init_from={g.init_from}")


def train_epoch(model, optimizer, train: Split, g: GrokParams, n_groups: int, shuffle: torch.Generator,
                device: torch.device) -> tuple[float, float]:
    """One pass over the shuffled training rows; returns the mean loss and the mean gradient norm."""
    order = torch.randperm(len(train.log2_h), generator=shuffle).to(train.x.device)
    total_loss, total_grad, steps = 0.0, 0.0, 0
    for index in order.split(g.batch_size):
        x = train.x[index].to(device, non_blocking=True)
        z, aux = model(x, x[:, -n_groups:])
        loss = log2_loss(z, train.log2_h[index].to(device, non_blocking=True)).mean()
        optimizer.zero_grad(set_to_none=True)
        (loss + g.balance_coef * aux).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))  # measure, don't clip
        optimizer.step()
        total_loss += loss.item() * len(index)
        total_grad += grad_norm.item()
        steps += 1
    return total_loss / len(train.log2_h), total_grad / steps


def write_outputs(out: Path, state: TrainState, layout: FeatureLayout, g: GrokParams) -> dict:
    """model.pt (the best weights), metrics.json, the histories and the plots under `out`; returns the metrics."""
    from labpipe.grok.plots import plot_history

    best, final = state.best, state.history[-1]
    val_history, spikes = state.extra["val_history"], state.extra["spikes"]
    save_torch({"model": best.weights, "layout": dataclasses.asdict(layout), "params": flatten(g),
                "epoch": best.step, "val_loss": best.value}, out / "model.pt")
    last_val = val_history[-1]
    metrics = {
        "best_val_loss": best.value,
        "best_epoch": best.step,
        "final_train_loss": final["train_loss"],
        "final_val_loss": last_val["val_loss"],
        "final_weight_norm": final["weight_norm"],
        "slingshot_epochs": spikes,
        "val_loss_per_group": {k: v for k, v in last_val.items() if k not in ("epoch", "val_loss")},
    }
    write_json(out / "metrics.json", metrics)
    train_columns = ["epoch", "train_loss", "grad_norm", "update_ratio", "lr", "weight_norm"]
    pd.DataFrame(state.history, columns=train_columns).to_csv(out / "train_history.csv", index=False)
    pd.DataFrame(val_history).to_csv(out / "val_history.csv", index=False)
    plot_history(state.history, val_history, spikes, out / "plots")
    return metrics
