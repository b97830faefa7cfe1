"""Stage lm_train: a Hugging Face Llama trained as a causal LM on the synthetic shards of stage synth.

Reads artifacts/synth/manifest.json and its shards; writes
  artifacts/lm/checkpoints/step_XXXXXXXX/  every checkpoint_every steps and at the last: a save_pretrained
                                           directory (config.json, model.safetensors), a published revision
                                           that later stages (dormancy, crosscoder) read; only the newest two
                                           (checkpoint.RESUME_KEPT) also hold trainer_state.pt, the resume
                                           state (optimizer, RNG, history, best weights, MLflow run id)
  artifacts/lm/model/                      save_pretrained of the weights with the best validation loss
  artifacts/lm/metrics.json, history.csv   one history row per step (val_loss where evaluated)
The MLflow run gets train_loss, lr, grad_norm and tokens_per_s every lm.log_every steps (means over the
window), tokens_seen and tokens_per_parameter (the budget: about 20 is compute-optimal), and val_loss every
eval_every steps; the best weights are logged as a model and become the champion
of lm-synthetic when their val loss beats the current one's (registry.py).

The model sees each row whole: input_ids = labels = the row, so position t is predicted from x_<t and x_0 is
never predicted (there is no BOS token). The optimizer is AdamW (betas lm.adam_beta1, lm.adam_beta2) with
weight decay on the matrices only (every projection, the token embedding and the LM head; not the RMSNorm
gains), the learning rate a linear warmup then a cosine decay to lr * min_lr_ratio at decay_steps, where it
stays; gradients are clipped to grad_clip. A step's batch is batch_size * grad_accum_steps rows, its gradients
accumulated over passes of at most batch_size rows.

Data parallel (distributed.py): launched as N ranks (lm.devices, torchrun or Slurm tasks), each rank reads its
share of every step's batch (lm.data: the ranks' shares are disjoint and together the batch), runs its passes
through DDP, which averages the gradients over the ranks in the last pass's backward, and validates its share
of the val rows; losses are summed over the ranks. The step's batch stays batch_size * grad_accum_steps rows
whatever N, so N ranks train the trajectory one process does (to float rounding), and a run resumes on another
number of ranks. Rank 0 alone checkpoints, logs and writes the outputs (labpipe.run).

Bad input stops the stage before the model is built: a missing manifest or shard, a shard whose sha256 is
not the manifest's, a vocabulary larger than the model's, rows longer than its context (the params' own
bounds are config.py's). Hashed are the val shards that validation reads and the train shards the run may
read (all of them, unless the split is far larger than max_steps * batch_size rows: see data.shards_read); a
terabyte is not hashed for a short run.

The run lifecycle is labpipe.run's. A killed run restarts from the newest checkpoint of its trajectory (the lm
params but max_steps and registry.NOT_TRAJECTORY, the manifest, the code, the init weights), in the same
MLflow run, and ends with the weights of an uninterrupted run: the batch order of epoch e is seeded with
seed + e, and the learning rate is a function of the step (its whole schedule state). max_steps is only the run
length: raising it continues a finished run in the same MLflow run, and the result equals a straight run of
the new length with the same decay_steps (steps past decay_steps train at the minimum rate; the evaluation a
run makes at its last step off the eval_every cadence is made after its last checkpoint, so an extension never
sees it). Checkpoints of another trajectory are moved to checkpoints/superseded/, unreadable
ones to checkpoints/unreadable/; neither is ever read as a revision. lm.init_from (a save_pretrained directory
such as a step_* checkpoint or artifacts/lm/model, or an MLflow model URI such as
models:/lm-synthetic@champion) replaces the seeded initial weights on a fresh start (a resume takes the checkpoint's);
the optimizer and the schedule start afresh, the weights' digest is part of the trajectory, and the source is
the MLflow tag labpipe.init_from.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from labpipe import distributed, registry
from labpipe.checkpoint import TorchRNG
from labpipe.config import LMParams, Params
from labpipe.device import resolve_device
from labpipe.errors import InputError
from labpipe.files import write_json
from labpipe.lm.data import ShardDataset, shards_read, training_batches
from labpipe.run import TrainingRun, TrainState
from labpipe.synth.manifest import MANIFEST, Manifest, load_manifest

OUT_DIR = Path(registry.stage("lm_train").training.out_dir)  # artifacts/lm
CHECKPOINTS = OUT_DIR / "checkpoints"
MODEL_DIR = OUT_DIR / "model"
HISTORY_COLUMNS = ["step", "train_loss", "val_loss", "lr", "grad_norm", "tokens_per_s"]  # dvc.yaml plots read them


# ----------------------------------------------------------------------------- inputs, checked up front


def model_vocab_size(lm: LMParams, manifest: Manifest) -> int:
    """lm.vocab_size, or the data's when it is 0; InputError when the data has symbols the model lacks."""
    if lm.vocab_size == 0:
        return manifest.vocab_size
    if lm.vocab_size < manifest.vocab_size:
        raise InputError(f"lm.vocab_size={lm.vocab_size} is smaller than the vocabulary of the synthetic data "
                         f"({manifest.vocab_size} symbols, {manifest.path}): set lm.vocab_size=0 to use the data's")
    return lm.vocab_size


def open_data(lm: LMParams) -> tuple[Manifest, ShardDataset, ShardDataset]:
    """The manifest and its train and val splits, after every check that does not read the shards' bytes."""
    manifest = load_manifest(MANIFEST)  # InputError without a manifest, ShardError for a missing shard
    model_vocab_size(lm, manifest)
    if manifest.seq_length > lm.context_length:
        raise InputError(f"the synthetic sequences have {manifest.seq_length} tokens (synth.seq_length, "
                         f"{manifest.path}), more than the model's context: lm.context_length={lm.context_length}")
    train, val = ShardDataset(manifest, "train"), ShardDataset(manifest, "val")
    for name, split in (("train", train), ("val", val)):
        if len(split) == 0:
            raise InputError(f"{manifest.path} lists no {name} sequences (synth.{name}_shards)")
    return manifest, train, val


def validation_rows(lm: LMParams, val: ShardDataset) -> int:
    """Validation (and lm_eval) uses the first eval_sequences rows of the val split: the same rows each time."""
    return min(lm.eval_sequences, len(val))


def verify_shards(dataset: ShardDataset, indices: list[int]) -> None:
    """ShardError naming the first of dataset.shards[indices] whose sha256 differs from the manifest's."""
    for index in tqdm(indices, desc=f"sha256 of {len(indices)} shards", unit="shard", leave=False):
        dataset.manifest.verify(dataset.shards[index])


def shards_of_rows(dataset: ShardDataset, rows: int) -> list[int]:
    """The shards that hold the first `rows` rows of a split."""
    return [i for i, start in enumerate(dataset.starts[:-1]) if start < rows]


# ----------------------------------------------------------------------------- model, optimizer, schedule, loss


def build_model(lm: LMParams, vocab_size: int) -> LlamaForCausalLM:
    """A Llama initialized from the torch RNG (seed it first); no BOS/EOS: rows are raw symbol sequences."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=lm.hidden_size,
        intermediate_size=lm.intermediate_size,
        num_hidden_layers=lm.layers,
        num_attention_heads=lm.heads,
        num_key_value_heads=lm.heads,
        max_position_embeddings=lm.context_length,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    return LlamaForCausalLM(config)


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay the matrices (projections, embedding, LM head), not the vectors (RMSNorm gains; Llama has no
    biases): decaying a norm's gain only pulls activations toward zero, it does not regularize a mapping."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def learning_rate(step: int, lm: LMParams) -> float:
    """The rate of update `step` (1-based): lr * step / warmup_steps up to warmup_steps, then a cosine from lr
    down to lr * min_lr_ratio, reached at step decay_steps; past decay_steps the rate stays at that minimum (a
    run extended beyond its schedule trains on at the floor). A function of the step alone: max_steps, the run
    length, plays no part, so a run of 2N steps equals a run of N extended by N."""
    if step <= lm.warmup_steps:
        return lm.lr * step / lm.warmup_steps
    min_lr = lm.lr * lm.min_lr_ratio
    if step >= lm.decay_steps:
        return min_lr
    progress = (step - lm.warmup_steps) / (lm.decay_steps - lm.warmup_steps)  # warmup_steps < step < decay_steps
    return min_lr + (lm.lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def causal_lm_loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of every x_t (t >= 1) given x_<t: Hugging Face shifts the labels inside."""
    return model(input_ids=tokens, labels=tokens).loss


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 on CUDA (fp32 master weights, fp32 loss); plain fp32 elsewhere, where bf16 matmuls are slow."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def accumulate_gradients(model: torch.nn.Module, tokens: torch.Tensor, batch_size: int, step_rows: int,
                         ranks: int, device: torch.device) -> float:
    """Backward passes over this rank's `tokens` in pieces of at most batch_size rows, each loss weighted by
    its share of the step's `step_rows` rows over all `ranks` (all rows have one length), and returns the sum
    of the weighted losses: summed over the ranks, the gradients and the loss are those of one pass over the
    whole step batch, whatever the split, the smaller last batch of an epoch included. Under DDP, which
    averages the gradients over the ranks, each loss is scaled by `ranks`, and only the last pass syncs; a rank
    whose share is empty still makes one pass, of weight 0, so that every rank joins the sync."""
    pieces = [(piece, len(piece) / step_rows) for piece in tokens.split(batch_size)] \
        or [(tokens.new_zeros((1, tokens.shape[1])), 0.0)]
    total = 0.0
    for number, (piece, weight) in enumerate(pieces, start=1):
        local = model.no_sync() if number < len(pieces) and hasattr(model, "no_sync") else contextlib.nullcontext()
        with local:
            with autocast(device):
                loss = causal_lm_loss(model, piece) * weight
            (loss * ranks).backward()
        total += loss.item()
    return total


@torch.no_grad()
def validation_loss(model: torch.nn.Module, val: ShardDataset, rows: int, batch_size: int, device: torch.device,
                    world: distributed.World = distributed.SINGLE) -> float:
    """Mean per-token causal LM loss over the first `rows` rows of the val split (all rows have one length),
    each rank computing its share."""
    model.eval()
    total = 0.0
    mine = range(rows)[distributed.share(rows, world)]
    for start in range(mine.start, mine.stop, batch_size):
        tokens = torch.stack([val[i] for i in range(start, min(start + batch_size, mine.stop))]).to(device)
        with autocast(device):
            total += causal_lm_loss(model, tokens).item() * len(tokens)
    model.train()
    return distributed.all_sum([total], world)[0] / rows


# ----------------------------------------------------------------------------- the stage


def run_train(params: Params) -> None:
    """Stage lm_train, in this process or as one rank of several."""
    lm = params.lm
    world = distributed.world()
    device = distributed.rank_device(world, resolve_device(lm.device, "lm.device"))
    manifest, train, val = open_data(lm)  # every rank checks: each stops with the same line
    eval_rows = validation_rows(lm, val)
    step_batch = lm.batch_size * lm.grad_accum_steps  # the rows of one optimizer step, over all ranks

    def verify_read_shards() -> None:
        """The sha256 of the val shards validation reads and of the train shards the run may read."""
        verify_shards(val, shards_of_rows(val, eval_rows))
        verify_shards(train, shards_read(train, step_batch, lm.seed, lm.max_steps))

    with distributed.process_group(world, device, lm.collective_timeout_s):
        distributed.from_main(world, verify_read_shards)  # rank 0 reads the bytes; a mismatch stops every rank
        train_model(params, world, device, manifest, train, val, eval_rows, step_batch)


def train_model(params: Params, world: distributed.World, device: torch.device, manifest: Manifest,
                train: ShardDataset, val: ShardDataset, eval_rows: int, step_batch: int) -> None:
    """The model, its run and its loop, on every rank; rank 0 writes the outputs."""
    lm = params.lm
    torch.manual_seed(lm.seed)
    model = build_model(lm, model_vocab_size(lm, manifest)).to(device).train()
    optimizer = torch.optim.AdamW(parameter_groups(model, lm.weight_decay), lr=lm.lr,
                                  betas=(lm.adam_beta1, lm.adam_beta2), fused=device.type == "cuda")
    parts = {"model": model, "optimizer": optimizer, "rng": TorchRNG(device)}

    # the manifest holds every shard's sha256
    with TrainingRun("lm_train", params, [manifest.path], parts, world=world) as run:
        history, extra = run.state.history, run.state.extra
        parameters = sum(p.numel() for p in model.parameters())
        extra.setdefault("tokens_seen", sum(record["tokens"] for record in history))
        run.set_tags({"device": str(device), "manifest": str(manifest.path), "train_sequences": len(train),
                      "val_sequences": eval_rows, "parameters": parameters, "ranks": world.size,
                      "step_batch": f"{step_batch} rows ({lm.batch_size} x {lm.grad_accum_steps}), "
                                    f"{step_batch // world.size} per rank"})
        # DDP around the model; torch.compile around DDP (its optimizer splits graphs at the gradient buckets)
        parallel = distributed.data_parallel(model, world, device)
        step_model = torch.compile(parallel) if lm.compile else parallel  # `model` saves cleanly

        def validate(step: int) -> float:
            history[-1]["val_loss"] = validation_loss(model, val, eval_rows, lm.batch_size, device, world)
            run.log({"val_loss": history[-1]["val_loss"]}, step=step)
            run.offer_best(history[-1]["val_loss"], model, step)
            return history[-1]["val_loss"]

        batches = training_batches(train, step_batch, lm.seed, lm.num_workers, start_step=run.state.step,
                                   pin_memory=device.type == "cuda", world=world)
        with contextlib.closing(batches):  # stops the loader's workers
            for step in run.steps("lm steps"):
                started = time.perf_counter()
                rows, step_rows = next(batches)
                tokens = rows.to(device, non_blocking=True)
                lr = learning_rate(step, lm)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.zero_grad(set_to_none=True)
                loss = accumulate_gradients(step_model, tokens, lm.batch_size, step_rows, world.size, device)
                loss = distributed.all_sum([loss], world)[0]
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), lm.grad_clip)
                optimizer.step()
                step_tokens = step_rows * manifest.seq_length
                history.append({"step": step, "train_loss": loss, "val_loss": math.nan, "lr": lr,
                                "grad_norm": grad_norm.item(), "tokens": step_tokens,
                                "seconds": time.perf_counter() - started})
                extra["tokens_seen"] += step_tokens

                if step % lm.log_every == 0 or step == run.length:
                    window = pd.DataFrame(history[-lm.log_every:])
                    run.log({"train_loss": window.train_loss.mean(), "lr": lr, "grad_norm": window.grad_norm.mean(),
                             "tokens_per_s": window.tokens.sum() / window.seconds.sum(),
                             "tokens_seen": extra["tokens_seen"],
                             "tokens_per_parameter": extra["tokens_seen"] / parameters}, step=step)
                if step % lm.eval_every == 0:
                    run.bar.set_postfix(loss=f"{loss:.4f}", val=f"{validate(step):.4f}")
        if math.isnan(history[-1]["val_loss"]):
            validate(run.state.step)  # the run ends off the eval_every cadence (run.py)
        if not run.main:
            return

        best_model = LlamaForCausalLM(model.config)
        best_model.load_state_dict(run.state.best.weights)
        with run.outputs() as out:
            metrics = write_outputs(out, run.state, best_model, lm.log_every)
        run.finish(best_model, metrics)


def write_outputs(out: Path, state: TrainState, best_model: LlamaForCausalLM, log_every: int) -> dict:
    """model/ (save_pretrained of the best weights), metrics.json and history.csv under `out`; returns the
    metrics."""
    best_model.save_pretrained(out / "model")
    history = pd.DataFrame(state.history)
    evaluated = history.dropna(subset=["val_loss"])
    tokens_seen = int(history.tokens.sum())
    metrics = {
        "best_val_loss": state.best.value,
        "best_step": state.best.step,
        "final_train_loss": float(history.train_loss.tail(log_every).mean()),  # a single batch is noisy
        "final_val_loss": float(evaluated.val_loss.iloc[-1]),
        "tokens_per_s": float(history.tokens.sum() / history.seconds.sum()),  # training steps only, no evals
        "tokens_seen": tokens_seen,
        # the compute-optimal budget is about 20 (Hoffmann et al. 2022); params.full.yaml aims at it
        "tokens_per_parameter": tokens_seen / sum(p.numel() for p in best_model.parameters()),
    }
    write_json(out / "metrics.json", metrics)
    history["tokens_per_s"] = history.tokens / history.seconds
    history[HISTORY_COLUMNS].to_csv(out / "history.csv", index=False)
    return metrics
