"""Stage grok_train: long AdamW training of an m-height regressor, watching weight norms for grokking.

Reads the balanced subsamples of stage mheight_subsample; writes artifacts/grok/{model.pt, metrics.json,
train_history.csv, val_history.csv, plots/}. The champion is chosen on val; the test split is evaluated once,
with the best weights, and reported beside it. The run lifecycle (resume, extend, init_from, checkpoints,
champion) is labpipe.run's: a killed run restarts from the newest checkpoint and ends with the same weights as
an uninterrupted one; raising grok.epochs continues a finished run. The learning rate is constant, so a run of
2N epochs is a run of N extended by N. With grok.stop_after_plateau the run ends once the val loss has not
improved for that many validations after the grokking epoch (labpipe.grok.diagnostics); the rule is evaluated
on the val history, so a resumed run stops where an uninterrupted one does.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm

from labpipe.config import GrokParams, Params, flatten
from labpipe.device import resolve_device
from labpipe.files import save_torch, write_json
from labpipe.grok import diagnostics
from labpipe.grok.features import FeatureLayout, Split, encode, make_layout, place
from labpipe.grok.models import build_model, log2_loss, log2_prediction, violation_penalty
from labpipe.mheight.data import TEST, TRAIN, VAL, read_dataset
from labpipe.run import TrainingRun, TrainState, load_into


def weight_norms(model: torch.nn.Module) -> dict[str, float]:
    """L2 norm of every weight matrix (per layer) and of all parameters together."""
    norms = {f"weight_norm/{name}": p.detach().norm().item() for name, p in model.named_parameters() if p.dim() >= 2}
    norms["weight_norm"] = torch.sqrt(sum(p.detach().pow(2).sum() for p in model.parameters())).item()
    return norms


def flat_parameters(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def group_name(group: tuple[int, int, int]) -> str:
    n, k, m = group
    return f"n{n}_k{k}_m{m}"


@dataclasses.dataclass
class Evaluation:
    loss: float  # log2-MSE over the split
    per_group: list[float]
    below_bound: float  # share of predictions below the sampled lower bound of their code
    below_bound_per_group: list[float]

    def metrics(self, prefix: str, groups: tuple) -> dict[str, float]:
        names = [group_name(g) for g in groups]
        return {f"{prefix}_loss": self.loss, f"{prefix}_below_bound": self.below_bound,
                **{f"{prefix}_loss/{n}": v for n, v in zip(names, self.per_group, strict=True)},
                **{f"{prefix}_below_bound/{n}": v for n, v in zip(names, self.below_bound_per_group, strict=True)}}


@torch.no_grad()
def evaluate(model: torch.nn.Module, split: Split, n_groups: int, device: torch.device,
             batch: int = 65536) -> Evaluation:
    """log2-MSE and the share of predictions below the bound, over the split and per group."""
    model.eval()
    sums = torch.zeros(3, n_groups, dtype=torch.float64, device=device)  # loss, below bound, rows
    for start in range(0, len(split.log2_h), batch):
        rows = slice(start, start + batch)
        group = split.group[rows].to(device)
        z, _aux = model(split.x[rows].to(device))
        loss = log2_loss(z, split.log2_h[rows].to(device), model.output_head).double()
        below = (log2_prediction(z, model.output_head) < split.log2_bound[rows].to(device)).double()
        for i, values in enumerate((loss, below, torch.ones_like(loss))):
            sums[i].index_add_(0, group, values)
    model.train()
    loss, below, count = sums
    per_group = (loss / count.clamp(min=1)).tolist()
    below_per_group = (below / count.clamp(min=1)).tolist()
    total = count.sum().clamp(min=1)
    return Evaluation((loss.sum() / total).item(), per_group, (below.sum() / total).item(), below_per_group)


def run_train(params: Params) -> None:
    """Stage grok_train."""
    g = params.grok
    device = resolve_device(g.device, "grok.device")
    train_frame = read_dataset(TRAIN)
    layout = make_layout(train_frame)
    train, val = encode(train_frame, layout), encode(read_dataset(VAL), layout)
    test = encode(read_dataset(TEST), layout)
    n_groups = len(layout.groups)
    train, val = place(train, device), place(val, device)

    torch.manual_seed(g.seed)
    model = build_model(g, layout).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=g.lr, weight_decay=g.weight_decay)
    shuffle = torch.Generator().manual_seed(g.seed)  # CPU generator: its state is saved and restored exactly
    spikes = diagnostics.SpikeDetector(g.spike_factor, g.spike_window)
    parts = {"model": model, "optimizer": optimizer, "shuffle": shuffle, "spikes": spikes}

    with TrainingRun("grok_train", params, [TRAIN, VAL, TEST], parts,
                     init=lambda loaded: init_weights(model, g, loaded)) as run:
        extra = run.state.extra
        extra.setdefault("val_history", [])
        extra.setdefault("spikes", [])
        run.set_tags({"device": str(device), "train_rows": len(train.log2_h), "val_rows": len(val.log2_h),
                      "test_rows": len(test.log2_h)})
        run.log({"excluded_infinite_train": train.excluded_infinite,
                 "excluded_infinite_val": val.excluded_infinite}, step=0)

        def validate(epoch: int) -> dict[str, float]:
            result = evaluate(model, val, n_groups, device)
            names = [group_name(gr) for gr in layout.groups]
            extra["val_history"].append({"epoch": epoch, "val_loss": result.loss, "val_below_bound": result.below_bound,
                                         **dict(zip(names, result.per_group, strict=True))})
            run.offer_best(result.loss, model, epoch)
            return result.metrics("val", layout.groups)

        def check_stop() -> None:
            if g.stop_after_plateau:
                reason = diagnostics.plateau_stop(extra["val_history"], g.grokking_window, g.grokking_drop,
                                                  g.stop_after_plateau)
                if reason:
                    run.stop(reason)
                    tqdm.write(f"grok_train: stopping: {reason}")

        check_stop()  # a resumed run that had stopped stays stopped
        for epoch in run.steps("grok epochs"):
            started = time.perf_counter()
            before = flat_parameters(model)
            train_loss, violation, grad_norm = train_epoch(model, optimizer, train, g, shuffle, device)
            after = flat_parameters(model)
            record = {
                "epoch": epoch,
                "train_loss": train_loss,
                "train_violation": violation,
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
                check_stop()
            run.log(metrics, step=epoch)
        if not extra["val_history"] or extra["val_history"][-1]["epoch"] != run.state.step:
            run.log(validate(run.state.step), step=run.state.step)  # the run ends off the cadence (run.py)

        model.load_state_dict(run.state.best.weights)
        tested = evaluate(model, place(test, device), n_groups, device) if len(test.log2_h) else None
        report = summarize(run.state, layout, g, val, tested, run.stop_reason)
        log_summary(run, report)
        with run.outputs() as out:
            write_outputs(out, run.state, layout, g, report)
        run.finish(model, report)


def init_weights(model: torch.nn.Module, g: GrokParams, loaded: list[dict]) -> None:
    """grok.init_from: the whole model's weights; grok.init_experts_from: one ResNet's weights per expert, or
    one ResNet's for every expert."""
    if g.init_experts_from:
        for index, expert in enumerate(model.experts):
            source = index if len(loaded) > 1 else 0
            load_into(expert, loaded[source], f"grok.init_experts_from[{source}]={g.init_experts_from[source]}")
    else:
        load_into(model, loaded[0], f"grok.init_from={g.init_from}")


def train_epoch(model, optimizer, train: Split, g: GrokParams, shuffle: torch.Generator,
                device: torch.device) -> tuple[float, float, float]:
    """One pass over the shuffled training rows; returns the mean log2-MSE, the mean violation penalty and the
    mean gradient norm. The loss minimised adds grok.violation_coef x the penalty and the MoE's balancing loss."""
    order = torch.randperm(len(train.log2_h), generator=shuffle).to(train.x.device)
    total_loss, total_violation, total_grad, steps = 0.0, 0.0, 0.0, 0
    for index in order.split(g.batch_size):
        z, aux = model(train.x[index].to(device, non_blocking=True))
        loss = log2_loss(z, train.log2_h[index].to(device, non_blocking=True), g.output_head).mean()
        violation = violation_penalty(log2_prediction(z, g.output_head),
                                      train.log2_bound[index].to(device, non_blocking=True)).mean()
        optimizer.zero_grad(set_to_none=True)
        (loss + g.violation_coef * violation + g.balance_coef * aux).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))  # measure, don't clip
        optimizer.step()
        total_loss += loss.item() * len(index)
        total_violation += violation.item() * len(index)
        total_grad += grad_norm.item()
        steps += 1
    return total_loss / len(train.log2_h), total_violation / len(train.log2_h), total_grad / steps


def summarize(state: TrainState, layout: FeatureLayout, g: GrokParams, val: Split, test: Evaluation | None,
              stop_reason: str | None) -> dict:
    """metrics.json: the best epoch's val (and test) log2-MSE overall and per group, the grokking epoch and the
    spikes with what followed them, how the run ended, and how group difficulty relates to the val loss."""
    best, final = state.best, state.history[-1]
    val_history, spikes = state.extra["val_history"], state.extra["spikes"]
    names = [group_name(gr) for gr in layout.groups]
    at_best = next(r for r in val_history if r["epoch"] == best.step)
    log2_h_std = [val.log2_h[val.group == i].double().std(unbiased=False).item() for i in range(len(names))]
    return {
        "best_val_loss": best.value,
        "best_epoch": best.step,
        "best_val_loss_per_group": {n: at_best[n] for n in names},
        "test_loss": None if test is None else test.loss,
        "test_loss_per_group": None if test is None else dict(zip(names, test.per_group, strict=True)),
        "test_below_bound": None if test is None else test.below_bound,
        "val_below_bound_at_best": at_best["val_below_bound"],
        "final_train_loss": final["train_loss"],
        "final_val_loss": val_history[-1]["val_loss"],
        "final_weight_norm": final["weight_norm"],
        "epochs_run": state.step,
        "stop_reason": stop_reason or "grok.epochs",
        "grokking": diagnostics.grokking(val_history, state.history, g.grokking_window, g.grokking_drop),
        "slingshot_epochs": spikes,
        "spikes": diagnostics.spike_effects(spikes, state.history, val_history, g.spike_window),
        # the seed: groups of high log2 h spread are the hard ones; r of the best epoch's per-group val loss
        "corr_val_loss_log2_h_std": diagnostics.correlation([at_best[n] for n in names], log2_h_std),
        "val_loss_per_group": {n: val_history[-1][n] for n in names},
    }


def log_summary(run: TrainingRun, report: dict) -> None:
    """The end-of-run figures as MLflow metrics and tags: the test split, the grokking epoch, the spikes."""
    metrics = {key: report[key] for key in ("test_loss", "test_below_bound", "corr_val_loss_log2_h_std")
               if report[key] is not None}
    metrics.update({f"test_loss/{name}": v for name, v in (report["test_loss_per_group"] or {}).items()})
    grokked = report["grokking"]
    if grokked:
        metrics["grokking_epoch"] = grokked["epoch"]
    run.log(metrics, step=run.state.step)
    for spike in report["spikes"]:
        run.log({f"spike/{key}": spike[key] for key in ("val_loss_change", "weight_norm_change")
                 if spike[key] is not None}, step=spike["epoch"])
    run.set_tags({"grokking_epoch": grokked["epoch"] if grokked else "none"})


def write_outputs(out: Path, state: TrainState, layout: FeatureLayout, g: GrokParams, report: dict) -> None:
    """model.pt (the best weights), metrics.json, the histories and the plots under `out`."""
    from labpipe.grok.plots import plot_history

    best = state.best
    save_torch({"model": best.weights, "layout": dataclasses.asdict(layout), "params": flatten(g),
                "epoch": best.step, "val_loss": best.value}, out / "model.pt")
    write_json(out / "metrics.json", report)
    pd.DataFrame(state.history).to_csv(out / "train_history.csv", index=False)  # per-layer norms included
    pd.DataFrame(state.extra["val_history"]).to_csv(out / "val_history.csv", index=False)
    grokking_epoch = report["grokking"]["epoch"] if report["grokking"] else None
    title = f"{g.model} {g.width}x{g.blocks}, wd={g.weight_decay:g}"
    plot_history(state.history, state.extra["val_history"], state.extra["spikes"], grokking_epoch, out / "plots",
                 title)

