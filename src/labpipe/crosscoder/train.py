"""Stage crosscoder_train: a sparse crosscoder trained on the activation buffer of stage activations.

Reads crosscoder.buffer_dir; writes artifacts/crosscoder/{model.pt, metrics.json, history.csv, epochs.csv,
plots/training.png}. The run is crosscoder.steps steps long, or crosscoder.epochs epochs of the buffer
(epochs * ceil(rows / batch_size) steps; the other key 0). Adam with

    lr(t)     = lr * min(1, (t + 1) / lr_warmup_steps, (steps - t) / (steps - t_decay))
                with t_decay = floor(lr_decay_start * steps) and the last factor only from t_decay on:
                warm-up, constant, then a linear decay that reaches 0 at `steps`
    lambda(t) = l1_coef * min(1, t / l1_warmup_steps)

for update t = 0 .. steps - 1, gradients clipped to norm grad_clip (0: not clipped). The metrics of metrics.py
go to history.csv, MLflow (experiment "crosscoders") and the progress bar every log_every steps, over that
step's batch; at each epoch's end (and at the run's end, for a partial last epoch) over the whole epoch's
tokens, to epochs.csv (epoch = its index from 0, as the seed's "Epoch 0"; step = the step it ended at) and
MLflow as epoch_<name>, and as a line like the seed's progress line. (The seed's own line shows its epoch's last
batch: its mean_active is a multiple of 1/4096 and its max_active an integer, which no mean over 3782 batches
is; epochs.csv is the whole epoch, history.csv at the epoch's last step that batch.)

The run lifecycle (checkpoints of the model, Adam's state, the dead-latent tracker and the epoch's running
sums; resume; init_from; the champion) is labpipe.run's. A killed run resumes from the newest checkpoint of its
fingerprint (params, the buffer's meta.json with its data sha256, the code) and ends with the same weights and
records as an uninterrupted one, in the same MLflow run: batch t is a function of (seed, t) alone
(buffer.ShuffledBatches), and nothing else is random after the init. A finished run cannot be extended: the
schedule is built on its length (the lr reaches 0 there), so the length is part of the fingerprint, counted in
steps whichever key gave it (epochs=2 of 128 batches and steps=256 are the same run), and raising it starts a
new run from the init. To train a finished crosscoder further, start a new run from its weights:
crosscoder.init_from=artifacts/crosscoder/model.pt (or models:/crosscoder@champion), with its own warm-up and
decay, Adam's state and the dead-latent tracker fresh.

Final metrics (final_<name> in MLflow, metrics.json) are measured over up to crosscoder.eval_rows rows spread
evenly through the buffer (training rows: the buffer has no held-out part), as one span centred on their mean,
beside the switching baseline: source b predicted from source a alone (see evaluate). Champion: the run is
registered as model "crosscoder" (alias champion) only if its final L0 lies in [champion_l0_min,
champion_l0_max] and its final mean_explained_variance beats the champion's; EVs compare only at equal
sparsity.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from labpipe import registry
from labpipe.config import CrosscoderParams, Params, flatten
from labpipe.crosscoder.buffer import META, ActivationBuffer, BatchStream
from labpipe.crosscoder.metrics import DeadLatents, Totals, combine, median, median_norms, span_metrics, span_sums
from labpipe.crosscoder.model import Crosscoder, LossTerms
from labpipe.device import resolve_device
from labpipe.files import save_torch, write_json
from labpipe.plotting import pyplot, save_figure
from labpipe.run import TrainingRun, load_into

STAGE = registry.STAGES["crosscoder_train"]
OUT_DIR = Path(STAGE.training.out_dir)
PROGRESS = ("mean_active", "max_active", "min_active", "total_inactive", "mean_explained_variance",
            "mean_explained_variance_a", "mean_explained_variance_b", "residual", "total_dead_neurons")


def lr_at(c: CrosscoderParams, t: int) -> float:
    factor = min(1.0, (t + 1) / c.lr_warmup_steps) if c.lr_warmup_steps > 0 else 1.0
    decay_start = int(c.lr_decay_start * c.steps)
    if t >= decay_start:
        factor = min(factor, (c.steps - t) / (c.steps - decay_start))
    return c.lr * factor


def l1_coef_at(c: CrosscoderParams, t: int) -> float:
    return c.l1_coef * min(1.0, t / c.l1_warmup_steps) if c.l1_warmup_steps > 0 else c.l1_coef


def in_steps(c: CrosscoderParams, batches_per_epoch: int) -> CrosscoderParams:
    """c with its run length in steps (epochs 0): what the schedule, the fingerprint and MLflow's params hold."""
    return c if c.epochs == 0 else dataclasses.replace(c, steps=c.epochs * batches_per_epoch, epochs=0)


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
    device = resolve_device(params.crosscoder.device, "crosscoder.device")
    buffer = ActivationBuffer.open(params.crosscoder.buffer_dir)
    batches_per_epoch = -(-buffer.rows // params.crosscoder.batch_size)
    c = in_steps(params.crosscoder, batches_per_epoch)
    params = dataclasses.replace(params, crosscoder=c)
    model = Crosscoder(buffer.d_a, buffer.d_b, c.dict_size)
    model.init_weights(c.init, c.transpose_init, c.dec_init_norm, torch.Generator().manual_seed(c.seed))
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=c.lr)
    dead = DeadLatents(c.dict_size, c.dead_window, device)
    epoch = Totals(device)  # the sums of the epoch so far
    parts = {"model": model, "optimizer": optimizer, "dead": dead, "epoch": epoch}

    # meta.json holds the buffer data's sha256 and the sources it came from
    with TrainingRun("crosscoder_train", params, [buffer.directory / META], parts,
                     init=lambda loaded: load_into(model, loaded[0], f"crosscoder.init_from={c.init_from}")) as run:
        run.set_tags({"device": str(device), "buffer_rows": buffer.rows, "d_a": buffer.d_a, "d_b": buffer.d_b,
                      "buffer_sha256": buffer.meta["sha256"], "batches_per_epoch": batches_per_epoch})
        epochs = run.state.extra.setdefault("epochs", [])  # epochs.csv's rows
        with BatchStream(buffer, c.batch_size, c.seed, run.state.step, c.steps, c.num_workers, device) as batches:
            for step, x in zip(run.steps("crosscoder"), batches, strict=True):
                lr, l1_coef = lr_at(c, step - 1), l1_coef_at(c, step - 1)
                f, x_hat, terms, grad_norm = train_step(model, optimizer, x, lr, l1_coef, c)
                dead.update(f)
                sums = {**span_sums(x, f, x_hat, buffer.d_a), "loss": terms.loss.detach() * len(x),
                        "l1": terms.l1.detach() * len(x)}
                epoch.add(sums)
                if step % c.log_every == 0 or step == c.steps:
                    metrics = {**span_metrics(sums), **median_norms(x, x_hat), **dead.metrics(),
                               "total_inactive": int((epoch.sums["latent_counts"] == 0).sum()),
                               "grad_norm": grad_norm.item(), "lr": lr, "lambda": l1_coef,
                               "epoch": step / batches_per_epoch}
                    run.state.history.append({"step": step, **metrics})
                    run.log(metrics, step)
                    run.bar.set_postfix(loss=f"{metrics['loss']:.4g}", ev=f"{metrics['mean_explained_variance']:.3f}",
                                        l0=f"{metrics['l0']:.1f}", dead=f"{metrics['pct_dead_neurons']:.1%}")
                if step % batches_per_epoch == 0 or step == c.steps:
                    row = {"epoch": (step - 1) // batches_per_epoch, "step": step,
                           **span_metrics(epoch.sums), **dead.metrics()}
                    epochs.append(row)
                    run.log({f"epoch_{name}": value for name, value in row.items() if name not in ("epoch", "step")},
                            step)
                    tqdm.write(f"Epoch {row['epoch']} (steps to {step}): "
                               + ", ".join(f"{name} {row[name]:.6g}" for name in PROGRESS))
                    epoch.reset()

        final = {**evaluate(model, buffer, c, device), **dead.metrics(), "steps": c.steps}
        final["in_l0_band"] = c.champion_l0_min <= final["l0"] <= c.champion_l0_max
        run.log({f"final_{name}": value for name, value in final.items()}, c.steps)
        print(f"final: mean explained variance {final['mean_explained_variance']:.4f} "
              f"(a {final['mean_explained_variance_a']:.4f}, b {final['mean_explained_variance_b']:.4f}), "
              f"L0 {final['l0']:.2f}, dead {final['pct_dead_neurons']:.2%}; source b: explained variance "
              f"{final['explained_variance_b']:.4f} "
              f"vs {final['switch_linear_explained_variance_b']:.4f} by the linear map from a "
              f"({'beaten' if final['beats_switch_linear'] else 'not beaten'})")
        run.offer_best(final["mean_explained_variance"], model, c.steps)
        with run.outputs() as out:
            write_outputs(out, model, buffer, run.state.history, epochs, final, c)
        run.finish(model, final)


@torch.no_grad()
def evaluate(model: Crosscoder, buffer: ActivationBuffer, c: CrosscoderParams, device: torch.device) -> dict:
    """The metrics of metrics.py over up to eval_rows rows spread evenly over the buffer, as one span centred
    on their mean mu, and the switching baseline, which predicts source b from source a alone:

        identity  b_hat = (s_b / s_a) a: the other source's rows as they are (the buffer's normalization undone;
                  only when d_a == d_b)
        linear    b_hat = mu^b + (a - mu^a) M, M the least-squares solution of (a - mu^a) M = b - mu^b over
                  the same rows: the affine map of least squared error

    each with switch_<name>_explained_variance_b, switch_<name>_mean_explained_variance_b and
    switch_<name>_mse_b defined as the crosscoder's, and beats_switch_linear = the crosscoder's
    explained_variance_b above the linear map's. Three passes: mu, then M (from its normal equations, summed in
    float64 on the host), then everything else.
    """
    model = model.to(device)
    rows = np.unique(np.linspace(0, buffer.rows - 1, min(c.eval_rows, buffer.rows)).astype(np.int64))
    array, scale = buffer.array(), buffer.scale_vector(device)
    a_cols, b_cols = model.sources()

    def chunks():
        for chunk in np.array_split(rows, -(-len(rows) // c.batch_size)):
            yield buffer.to_float(torch.from_numpy(array[chunk].view(np.int16)).to(device), scale)

    mu = (sum(x.sum(dim=0).cpu().double() for x in chunks()) / len(rows)).float().to(device)
    gram, cross = torch.zeros(buffer.d_a, buffer.d_a, dtype=torch.float64), torch.zeros(
        buffer.d_a, buffer.d_b, dtype=torch.float64)
    for x in chunks():
        a, b = x[:, a_cols] - mu[a_cols], x[:, b_cols] - mu[b_cols]
        gram += (a.T @ a).cpu().double()
        cross += (a.T @ b).cpu().double()
    linear_map = torch.linalg.lstsq(gram, cross).solution.float().to(device)
    predictors = {"linear": lambda a: mu[b_cols] + (a - mu[a_cols]) @ linear_map}
    if buffer.d_a == buffer.d_b:
        predictors["identity"] = lambda a: a * (buffer.scales[1] / buffer.scales[0])

    sums, switch, input_norms, error_norms = None, {name: None for name in predictors}, [], []
    for x in chunks():
        f, x_hat = model(x)
        sums = combine(sums, span_sums(x, f, x_hat, buffer.d_a, mu))
        for name, predict in predictors.items():  # as a "crosscoder" that keeps a and predicts b from it
            guess = torch.cat([x[:, a_cols], predict(x[:, a_cols])], dim=1)
            switch[name] = combine(switch[name], span_sums(x, f, guess, buffer.d_a, mu))
        input_norms.append(x.norm(dim=1).cpu())
        error_norms.append((x - x_hat).norm(dim=1).cpu())
    final = {**span_metrics(sums), "median_input_norm": median(torch.cat(input_norms)),
             "median_error_norm": median(torch.cat(error_norms)), "eval_rows": len(rows)}
    for name, totals in switch.items():
        baseline = span_metrics(totals)
        for metric in ("explained_variance_b", "mean_explained_variance_b", "mse_b"):
            final[f"switch_{name}_{metric}"] = baseline[metric]
    final["beats_switch_linear"] = final["explained_variance_b"] > final["switch_linear_explained_variance_b"]
    return final


def write_outputs(out: Path, model: Crosscoder, buffer: ActivationBuffer, history: list[dict], epochs: list[dict],
                  final: dict, c: CrosscoderParams) -> None:
    """model.pt (the final weights and what they were trained on), metrics.json, history.csv, epochs.csv and the
    plot under `out`."""
    save_torch({"model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "config": model.config,
                "scales": list(buffer.scales), "params": flatten(c), "step": c.steps,
                "buffer": {"directory": str(buffer.directory), "sha256": buffer.meta["sha256"],
                           "inputs": buffer.meta["inputs"]}}, out / "model.pt")
    write_json(out / "metrics.json", {**final, "l0_band": [c.champion_l0_min, c.champion_l0_max]})
    frame = pd.DataFrame(history)
    frame.to_csv(out / "history.csv", index=False)
    pd.DataFrame(epochs).to_csv(out / "epochs.csv", index=False)
    plot_training(frame, final, out / "plots" / "training.png",
                  f"crosscoder F={c.dict_size}, dec_init_norm={c.dec_init_norm:g}, decoder norms in penalty: "
                  f"{c.decoder_norm_in_penalty}")


def plot_training(history: pd.DataFrame, final: dict, path: Path, title: str) -> None:
    """Explained variance (a, b, mean; the switching baseline's for b) and dead latents (%) against the step;
    `title` names the run's settings."""
    plt = pyplot()
    figure, (ev, dead) = plt.subplots(1, 2, figsize=(10, 4))
    for column, label in (("mean_explained_variance", "mean"), ("mean_explained_variance_a", "source a"),
                          ("mean_explained_variance_b", "source b")):
        ev.plot(history.step, history[column], label=label)
    ev.axhline(final["switch_linear_mean_explained_variance_b"], color="gray", linestyle="--",
               label="b by a linear map from a")
    ev.set(xlabel="step", ylabel="mean explained variance (batch)", title="Reconstruction",
           ylim=(0, 1))  # below 0 (worse than the batch mean, the first steps) is off the chart
    ev.legend()
    dead.plot(history.step, 100 * history.pct_dead_neurons)
    dead.set(xlabel="step", ylabel="dead latents (%)", title="Dead latents")
    figure.suptitle(title)
    save_figure(figure, path)

