"""Stage crosscoder_train: a sparse crosscoder trained on the activation buffer of stage activations.

Reads crosscoder.buffer_dir; writes artifacts/crosscoder/{model.pt, metrics.json, history.csv,
plots/training.png}. Adam with

    lr(t)     = lr * min(1, (t + 1) / lr_warmup_steps, (steps - t) / (steps - t_decay))
                with t_decay = floor(lr_decay_start * steps) and the last factor only from t_decay on:
                warm-up, constant, then a linear decay that reaches 0 at `steps`
    lambda(t) = l1_coef * min(1, t / l1_warmup_steps)

for update t = 0 .. steps - 1, gradients clipped to norm grad_clip (0: not clipped). Every log_every steps the
metrics of metrics.py go to history.csv, MLflow (experiment "crosscoders") and the progress bar.

The run lifecycle (checkpoints of the model, Adam's state and the dead-latent tracker; resume; init_from; the
champion) is labpipe.run's. A killed run resumes from the newest checkpoint of its fingerprint (params, the
buffer's meta.json with its data sha256, the code) and ends with the same weights as an uninterrupted one, in the
same MLflow run: batch t is a function of (seed, t) alone (buffer.ShuffledBatches), and nothing else is random
after the init. A finished run cannot be extended: the schedule is built on `steps` (the lr reaches 0 there), so
crosscoder.steps is part of the fingerprint and raising it starts a new run from the init. To train a finished
crosscoder further, start a new run from its weights: crosscoder.init_from=artifacts/crosscoder/model.pt (or
models:/crosscoder@champion), with its own warm-up and decay, Adam's state and the dead-latent tracker fresh.

Final metrics are measured over up to crosscoder.eval_rows rows spread evenly through the buffer (training rows:
the buffer has no held-out part). Champion: the run is registered as model "crosscoder" (alias champion) only if
its final L0 lies in [champion_l0_min, champion_l0_max] and its final mean explained variance beats the
champion's; EVs compare only at equal sparsity.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from labpipe import registry
from labpipe.config import CrosscoderParams, Params, flatten
from labpipe.crosscoder.buffer import META, ActivationBuffer, BatchStream
from labpipe.crosscoder.metrics import DeadLatents, batch_metrics
from labpipe.crosscoder.model import Crosscoder, LossTerms
from labpipe.device import resolve_device
from labpipe.errors import InputError
from labpipe.files import atomic_path, save_torch, write_json
from labpipe.plotting import pyplot, save_figure
from labpipe.run import TrainingRun, load_into

STAGE = registry.STAGES["crosscoder_train"]
OUT_DIR = Path(STAGE.training.out_dir)


def lr_at(c: CrosscoderParams, t: int) -> float:
    factor = min(1.0, (t + 1) / c.lr_warmup_steps) if c.lr_warmup_steps > 0 else 1.0
    decay_start = int(c.lr_decay_start * c.steps)
    if t >= decay_start:
        factor = min(factor, (c.steps - t) / (c.steps - decay_start))
    return c.lr * factor


def l1_coef_at(c: CrosscoderParams, t: int) -> float:
    return c.l1_coef * min(1.0, t / c.l1_warmup_steps) if c.l1_warmup_steps > 0 else c.l1_coef


def train_step(model: Crosscoder, optimizer: torch.optim.Optimizer, x: torch.Tensor, lr: float, l1_coef: float,
               c: CrosscoderParams) -> tuple[torch.Tensor, torch.Tensor, LossTerms, torch.Tensor]:
    """One Adam update on batch x; returns (f, x_hat, loss terms, gradient norm before clipping)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    f, x_hat = model(x)
    terms = model.loss_terms(x, f, x_hat, l1_coef, c.decoder_norm_in_penalty)
    optimizer.zero_grad(set_to_none=True)
    terms.loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip if c.grad_clip > 0 else math.inf)
    optimizer.step()
    return f.detach(), x_hat.detach(), terms, grad_norm


def run_train(params: Params) -> None:
    """Stage crosscoder_train."""
    c = params.crosscoder
    device = resolve_device(c.device, "crosscoder.device")
    buffer = ActivationBuffer.open(c.buffer_dir)
    model = Crosscoder(buffer.d_a, buffer.d_b, c.dict_size)
    model.init_weights(c.init, c.transpose_init, c.dec_init_norm, torch.Generator().manual_seed(c.seed))
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=c.lr)
    dead = DeadLatents(c.dict_size, c.dead_window, device)
    batches_per_epoch = -(-buffer.rows // c.batch_size)
    parts = {"model": model, "optimizer": optimizer, "dead": dead}

    # meta.json holds the buffer data's sha256 and the sources it came from
    with TrainingRun("crosscoder_train", params, [buffer.directory / META], parts,
                     init=lambda loaded: load_into(model, loaded[0], f"crosscoder.init_from={c.init_from}")) as run:
        run.set_tags({"device": str(device), "buffer_rows": buffer.rows, "d_a": buffer.d_a, "d_b": buffer.d_b,
                      "buffer_sha256": buffer.meta["sha256"]})
        with BatchStream(buffer, c.batch_size, c.seed, run.state.step, c.steps, c.num_workers, device) as batches:
            for step, x in zip(run.steps("crosscoder"), batches, strict=True):
                lr, l1_coef = lr_at(c, step - 1), l1_coef_at(c, step - 1)
                f, x_hat, terms, grad_norm = train_step(model, optimizer, x, lr, l1_coef, c)
                dead.update(f)
                if step % c.log_every == 0 or step == c.steps:
                    metrics = {**batch_metrics(x, f, x_hat, buffer.d_a, dead, loss=terms.loss, mse=terms.mse,
                                               l1=terms.l1, grad_norm=grad_norm),
                               "lr": lr, "lambda": l1_coef, "epoch": step / batches_per_epoch}
                    run.state.history.append({"step": step, **metrics})
                    run.log(metrics, step)
                    run.bar.set_postfix(loss=f"{metrics['loss']:.4g}", ev=f"{metrics['mean_explained_variance']:.3f}",
                                        l0=f"{metrics['l0']:.1f}", dead=f"{metrics['pct_dead_neurons']:.1%}")

        final = {**evaluate(model, buffer, c, device), "total_dead_neurons": int(dead.dead().sum()),
                 "pct_dead_neurons": float(dead.dead().float().mean()), "total_neurons": c.dict_size,
                 "steps": c.steps}
        final["in_l0_band"] = c.champion_l0_min <= final["l0"] <= c.champion_l0_max
        run.log({f"final_{name}": value for name, value in final.items()}, c.steps)
        print(f"final: explained variance {final['mean_explained_variance']:.4f} "
              f"(a {final['mean_explained_variance_a']:.4f}, b {final['mean_explained_variance_b']:.4f}), "
              f"L0 {final['l0']:.2f}, dead {final['pct_dead_neurons']:.2%}")
        run.offer_best(final["mean_explained_variance"], model, c.steps)
        with run.outputs() as out:
            write_outputs(out, model, buffer, run.state.history, final, c)
        run.finish(model, final)


@torch.no_grad()
def evaluate(model: Crosscoder, buffer: ActivationBuffer, c: CrosscoderParams, device: torch.device) -> dict:
    """Explained variance per source, L0, mse and l1 over up to eval_rows rows spread evenly over the buffer.

    EV_s = 1 - sum ||a^s - a_hat^s||^2 / sum ||a^s - mean(a^s)||^2 over all those rows, in one pass with
    sum ||a - mean||^2 = sum ||a||^2 - ||sum a||^2 / n, the sums of each chunk added up in float64 on the host.
    """
    model = model.to(device)
    rows = np.unique(np.linspace(0, buffer.rows - 1, min(c.eval_rows, buffer.rows)).astype(np.int64))
    array, scale = buffer.array(), buffer.scale_vector(device)
    sources = model.sources()
    residual, squares = torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    sums = torch.zeros(buffer.width, dtype=torch.float64)
    mse = l1 = active = 0.0
    for chunk in np.array_split(rows, -(-len(rows) // c.batch_size)):
        x = buffer.to_float(torch.from_numpy(array[chunk].view(np.int16)).to(device), scale)
        f, x_hat = model(x)
        terms = model.loss_terms(x, f, x_hat, 0.0, c.decoder_norm_in_penalty)
        error = (x - x_hat).pow(2)
        residual += torch.stack([error[:, s].sum() for s in sources]).cpu().double()
        squares += torch.stack([x[:, s].pow(2).sum() for s in sources]).cpu().double()
        sums += x.sum(dim=0).cpu().double()
        mse += terms.mse.item() * len(chunk)
        l1 += terms.l1.item() * len(chunk)
        active += (f > 0).sum().item()
    n = len(rows)
    total = squares - torch.stack([sums[s].pow(2).sum() for s in sources]) / n
    ev_a, ev_b = (1 - residual / total).tolist()
    return {"mean_explained_variance": (ev_a + ev_b) / 2, "mean_explained_variance_a": ev_a,
            "mean_explained_variance_b": ev_b, "l0": active / n, "mse": mse / n, "l1": l1 / n, "eval_rows": n}


def write_outputs(out: Path, model: Crosscoder, buffer: ActivationBuffer, history: list[dict], final: dict,
                  c: CrosscoderParams) -> None:
    """model.pt (the final weights and what they were trained on), metrics.json, history.csv and the plot under
    `out`."""
    save_torch({"model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "config": model.config,
                "scales": list(buffer.scales), "params": flatten(c), "step": c.steps,
                "buffer": {"directory": str(buffer.directory), "sha256": buffer.meta["sha256"],
                           "inputs": buffer.meta["inputs"]}}, out / "model.pt")
    write_json(out / "metrics.json", {**final, "l0_band": [c.champion_l0_min, c.champion_l0_max]})
    frame = pd.DataFrame(history)
    frame.to_csv(out / "history.csv", index=False)
    plot_training(frame, out / "plots" / "training.png")


def plot_training(history: pd.DataFrame, path: Path) -> None:
    """Explained variance (a, b, mean) and dead latents (%) against the step."""
    plt = pyplot()
    figure, (ev, dead) = plt.subplots(1, 2, figsize=(10, 4))
    for column, label in (("mean_explained_variance", "mean"), ("mean_explained_variance_a", "source a"),
                          ("mean_explained_variance_b", "source b")):
        ev.plot(history.step, history[column], label=label)
    ev.set(xlabel="step", ylabel="explained variance (batch)", title="Reconstruction",
           ylim=(0, 1))  # below 0 (worse than the batch mean, the first steps) is off the chart
    ev.legend()
    dead.plot(history.step, 100 * history.pct_dead_neurons)
    dead.set(xlabel="step", ylabel="dead latents (%)", title="Dead latents")
    save_figure(figure, path)


# ----------------------------------------------------------------------------- the dec_init_norm sweep

# Params that do not change what a run computes (the registry's, less eval_rows: it changes the final metrics the
# sweep compares): runs that differ only in these (and dec_init_norm) compare.
_NOT_RESULTS = {f"crosscoder.{key}" for key in (*registry.NOT_TRAJECTORY, *STAGE.training.also_not_trajectory)
                if key != "eval_rows"}
SWEEP_COLUMNS = ("mean_explained_variance", "mean_explained_variance_a", "mean_explained_variance_b",
                 "pct_dead_neurons", "total_dead_neurons", "l0")


def sweep_table(tracking_uri: str) -> pd.DataFrame:
    """One row per dec_init_norm: the final metrics of the finished crosscoder_train runs comparable to the
    newest one (equal in every param that changes the result, but dec_init_norm), the newest run per value."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    line = registry.line_of(STAGE.name).experiment
    experiment = client.get_experiment_by_name(line)
    runs = [] if experiment is None else client.search_runs(
        [experiment.experiment_id], "tags.`labpipe.stage` = 'crosscoder_train' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"])
    runs = [run for run in runs if "final_mean_explained_variance" in run.data.metrics]
    if not runs:
        raise InputError(f"no finished crosscoder_train runs in experiment {line!r} of {tracking_uri}")

    def setting(run) -> dict:
        return {k: v for k, v in run.data.params.items() if k not in _NOT_RESULTS | {"crosscoder.dec_init_norm"}}

    rows = {}
    for run in runs:  # newest first
        norm = float(run.data.params["crosscoder.dec_init_norm"])
        if setting(run) == setting(runs[0]) and norm not in rows:
            rows[norm] = {"dec_init_norm": norm, "run_id": run.info.run_id,
                          **{name: run.data.metrics[f"final_{name}"] for name in SWEEP_COLUMNS}}
    return pd.DataFrame(sorted(rows.values(), key=lambda row: row["dec_init_norm"]))


def plot_sweep(tracking_uri: str, out_path: str | Path) -> pd.DataFrame:
    """Dead latents and explained variance against dec_init_norm (the seed's sweep: 0.03 .. 1) from the MLflow
    runs of the crosscoders experiment; writes the plot and its table (a CSV beside it). Returns the table."""
    out_path = Path(out_path)
    table = sweep_table(tracking_uri)
    plt = pyplot()
    figure, (dead, ev) = plt.subplots(1, 2, figsize=(10, 4))
    dead.plot(table.dec_init_norm, 100 * table.pct_dead_neurons, marker="o")
    dead.set(xscale="log", xlabel="dec_init_norm", ylabel="dead latents at the end (%)", title="Dead latents")
    for column, label in (("mean_explained_variance", "mean"), ("mean_explained_variance_a", "source a"),
                          ("mean_explained_variance_b", "source b")):
        ev.plot(table.dec_init_norm, table[column], marker="o", label=label)
    ev.set(xscale="log", xlabel="dec_init_norm", ylabel="explained variance", title="Reconstruction")
    ev.legend()
    save_figure(figure, out_path)
    with atomic_path(out_path.with_suffix(".csv")) as tmp:
        table.to_csv(tmp, index=False)
    return table


def main(argv: list[str] | None = None) -> int:
    """labpipe crosscoder-sweep-plot [--out PATH] [--tracking-uri URI]."""
    from labpipe.tracking import tracking_uri

    parser = argparse.ArgumentParser(prog="labpipe crosscoder-sweep-plot", description=plot_sweep.__doc__)
    parser.add_argument("--out", default=str(OUT_DIR / "sweep" / "dec_init_norm.png"))
    parser.add_argument("--tracking-uri", default=None, help="default: the project's store (MLFLOW_TRACKING_URI)")
    args = parser.parse_args(argv)
    try:
        table = plot_sweep(args.tracking_uri or tracking_uri(), args.out)
    except ValueError as error:
        print(f"crosscoder-sweep-plot: error: {error}")
        return 2
    print(table.to_string(index=False))
    print(f"wrote {args.out} and {Path(args.out).with_suffix('.csv')}")
    return 0
