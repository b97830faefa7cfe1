"""Stage lm_train: a Hugging Face Llama trained as a causal LM on the synthetic shards of stage synth.

Reads artifacts/synth/manifest.json and its shards; writes
  artifacts/lm/checkpoints/step_XXXXXXXX/  save_pretrained directories (config.json, model.safetensors) every
                                           checkpoint_every steps and at the end, each with trainer_state.pt
                                           (optimizer, RNG, history, best weights, MLflow run id, fingerprint);
                                           later stages (dormancy, crosscoder) read them as revisions
  artifacts/lm/model/                      save_pretrained of the weights with the best validation loss
  artifacts/lm/metrics.json, history.csv   one history row per step (val_loss where evaluated)
The MLflow run gets train_loss, lr, grad_norm and tokens_per_s every LOG_EVERY steps (means over the window)
and val_loss every eval_every steps; the best weights are logged as a model and become the champion of
lm-synthetic when their val loss beats the current one's.

The model sees each row whole: input_ids = labels = the row, so position t is predicted from x_<t and x_0 is
never predicted (there is no BOS token). The optimizer is AdamW with weight decay on the matrices only
(every projection, the token embedding and the LM head; not the RMSNorm gains), the learning rate a linear
warmup then a cosine decay to lr * min_lr_ratio at max_steps; gradients are clipped to grad_clip.

Bad input stops the stage before the model is built: a missing manifest or shard, a shard whose sha256 is
not the manifest's, a vocabulary larger than the model's, rows longer than its context. Hashed are the val
shards that validation reads and the train shards the run may read (all of them, unless the split is far
larger than max_steps * batch_size rows: see data.shards_read); a terabyte is not hashed for a short run.

A killed run restarts from the newest checkpoint whose fingerprint (lm params, the manifest, this package's
code) matches, in the same MLflow run, and ends with the weights of an uninterrupted run: the batch order of
epoch e is seeded with seed + e, and the learning rate is a function of the step (its whole schedule state).
"""

from __future__ import annotations

import contextlib
import math
import re
import shutil
import time
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from labpipe import checkpoint
from labpipe.config import LMParams, Params, flatten
from labpipe.device import resolve_device
from labpipe.errors import InputError
from labpipe.files import atomic_dir, atomic_path, write_json
from labpipe.lm.data import ShardDataset, shards_read, training_batches
from labpipe.synth.manifest import MANIFEST, Manifest, load_manifest
from labpipe.text.stages import LINE

OUT_DIR = Path("artifacts/lm")
CHECKPOINTS = OUT_DIR / "checkpoints"
MODEL_DIR = OUT_DIR / "model"
TRAINER_STATE = "trainer_state.pt"  # beside the weights in every checkpoint directory
REGISTERED_MODEL = "lm-synthetic"
ADAM_BETAS = (0.9, 0.95)  # Llama's; the second moment forgets fast enough for a short warmup
LOG_EVERY = 10  # steps per MLflow point (means over the window): an MLflow write costs ~3 ms, a tiny step ~20 ms

_STEP_DIR = re.compile(r"^step_\d{8}$")


# ----------------------------------------------------------------------------- inputs, checked up front


def check_params(lm: LMParams) -> None:
    """ValueError for lm params that would fail later, or silently train something else."""
    if lm.hidden_size % lm.heads:
        raise InputError(f"lm.hidden_size={lm.hidden_size} is not a multiple of lm.heads={lm.heads}")
    for name in ("max_steps", "batch_size", "eval_every", "eval_sequences", "checkpoint_every"):
        if getattr(lm, name) < 1:
            raise InputError(f"lm.{name} must be at least 1, got {getattr(lm, name)}")
    if not 0 <= lm.warmup_steps <= lm.max_steps:
        raise InputError(f"lm.warmup_steps={lm.warmup_steps} must lie in [0, lm.max_steps={lm.max_steps}]")


def model_vocab_size(lm: LMParams, manifest: Manifest) -> int:
    """lm.vocab_size, or the data's when it is 0; ValueError when the data has symbols the model lacks."""
    if lm.vocab_size == 0:
        return manifest.vocab_size
    if lm.vocab_size < manifest.vocab_size:
        raise InputError(f"lm.vocab_size={lm.vocab_size} is smaller than the vocabulary of the synthetic data "
                         f"({manifest.vocab_size} symbols, {manifest.path}): set lm.vocab_size=0 to use the data's")
    return lm.vocab_size


def open_data(lm: LMParams) -> tuple[Manifest, ShardDataset, ShardDataset]:
    """The manifest and its train and val splits, after every check that does not read the shards' bytes."""
    check_params(lm)
    manifest = load_manifest(MANIFEST)  # ValueError without a manifest, ShardError for a missing shard
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
    down to lr * min_lr_ratio, reached at step max_steps."""
    if step <= lm.warmup_steps:
        return lm.lr * step / lm.warmup_steps
    progress = (step - lm.warmup_steps) / max(1, lm.max_steps - lm.warmup_steps)
    min_lr = lm.lr * lm.min_lr_ratio
    return min_lr + (lm.lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def causal_lm_loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of every x_t (t >= 1) given x_<t: Hugging Face shifts the labels inside."""
    return model(input_ids=tokens, labels=tokens).loss


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 on CUDA (fp32 master weights, fp32 loss); plain fp32 elsewhere, where bf16 matmuls are slow."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def validation_loss(model: torch.nn.Module, val: ShardDataset, rows: int, batch_size: int,
                    device: torch.device) -> float:
    """Mean per-token causal LM loss over the first `rows` rows of the val split (all rows have one length)."""
    model.eval()
    total = 0.0
    for start in range(0, rows, batch_size):
        tokens = torch.stack([val[i] for i in range(start, min(start + batch_size, rows))]).to(device)
        with autocast(device):
            total += causal_lm_loss(model, tokens).item() * len(tokens)
    model.train()
    return total / rows


# ----------------------------------------------------------------------------- checkpoints


def list_checkpoints(directory: str | Path = CHECKPOINTS) -> list[Path]:
    """Complete checkpoint directories, oldest first (atomic_dir's temp directories start with a dot)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _STEP_DIR.match(p.name) and (p / TRAINER_STATE).is_file())


def save_checkpoint(model: LlamaForCausalLM, step: int, trainer_state: dict, keep: int) -> Path:
    """save_pretrained + trainer_state.pt, all or nothing; keep the newest `keep` directories (0: all)."""
    path = CHECKPOINTS / f"step_{step:08d}"
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        torch.save(trainer_state, tmp / TRAINER_STATE)
    if keep > 0:
        for old in list_checkpoints()[:-keep]:
            shutil.rmtree(old)
    return path


def resume(fingerprint: str) -> tuple[Path, dict] | None:
    """The newest checkpoint and its trainer state if made with `fingerprint`, else None; checkpoints of
    another fingerprint are deleted, so that one trajectory's revisions are never mixed with another's."""
    found = list_checkpoints()
    if not found:
        return None
    # weights_only=False: the trainer state holds Python records and RNG states, and is our own file.
    saved = torch.load(found[-1] / TRAINER_STATE, map_location="cpu", weights_only=False)
    if saved.get("fingerprint") == fingerprint:
        print(f"resuming from {found[-1]} (step {saved['state']['step']})")
        return found[-1], saved
    print(f"checkpoints in {CHECKPOINTS} were made with other params, data or code: starting afresh")
    shutil.rmtree(CHECKPOINTS)
    return None


def rng_states(device: torch.device) -> dict:
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None}


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None:
        torch.cuda.set_rng_state_all(states["cuda"])


# ----------------------------------------------------------------------------- the stage


def run_train(params: Params) -> None:
    """Stage lm_train."""
    from labpipe.tracking import register_if_better, stage_run

    lm = params.lm
    device = resolve_device(lm.device)
    manifest, train, val = open_data(lm)
    eval_rows = validation_rows(lm, val)
    verify_shards(val, shards_of_rows(val, eval_rows))
    verify_shards(train, shards_read(train, lm.batch_size, lm.seed, lm.max_steps))

    # the manifest holds every shard's sha256
    fp = checkpoint.fingerprint(lm, [manifest.path], Path(__file__).parent)
    saved = resume(fp)
    if saved is None:
        torch.manual_seed(lm.seed)
        model = build_model(lm, model_vocab_size(lm, manifest))
        state = {"step": 0, "history": [], "best": None, "run_id": None}
    else:
        path, trainer_state = saved
        model = LlamaForCausalLM.from_pretrained(path)
        state = trainer_state["state"]
    model.to(device).train()
    optimizer = torch.optim.AdamW(parameter_groups(model, lm.weight_decay), lr=lm.lr, betas=ADAM_BETAS,
                                  fused=device.type == "cuda")
    if saved is not None:
        optimizer.load_state_dict(trainer_state["optimizer"])
        set_rng_states(trainer_state["rng"])
    step_model = torch.compile(model) if lm.compile else model  # the same parameters; `model` saves cleanly

    with stage_run(params.tracking, LINE, "lm_train", flatten(lm, "lm."), state["run_id"]) as run:
        state["run_id"] = run.run_id
        run.set_tags({"device": str(device), "manifest": str(manifest.path), "train_sequences": len(train),
                      "val_sequences": eval_rows, "parameters": sum(p.numel() for p in model.parameters())})
        batches = training_batches(train, lm.batch_size, lm.seed, lm.num_workers, start_step=state["step"],
                                   pin_memory=device.type == "cuda")
        bar = tqdm(range(state["step"] + 1, lm.max_steps + 1), desc="lm steps", unit="step",
                   initial=state["step"], total=lm.max_steps)
        for step in bar:
            started = time.perf_counter()
            tokens = next(batches).to(device, non_blocking=True)
            lr = learning_rate(step, lm)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with autocast(device):
                loss = causal_lm_loss(step_model, tokens)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), lm.grad_clip)
            optimizer.step()
            record = {"step": step, "train_loss": loss.item(), "val_loss": math.nan, "lr": lr,
                      "grad_norm": grad_norm.item(), "tokens": tokens.numel(),
                      "seconds": time.perf_counter() - started}
            state["history"].append(record)

            if step % LOG_EVERY == 0 or step == lm.max_steps:
                window = pd.DataFrame(state["history"][-LOG_EVERY:])
                run.log_metrics({"train_loss": window.train_loss.mean(), "lr": lr,
                                 "grad_norm": window.grad_norm.mean(),
                                 "tokens_per_s": window.tokens.sum() / window.seconds.sum()}, step=step)
            if step % lm.eval_every == 0 or step == lm.max_steps:
                record["val_loss"] = validation_loss(model, val, eval_rows, lm.batch_size, device)
                run.log_metrics({"val_loss": record["val_loss"]}, step=step)
                if state["best"] is None or record["val_loss"] < state["best"]["val_loss"]:
                    state["best"] = {"step": step, "val_loss": record["val_loss"],
                                     "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
                bar.set_postfix(loss=f"{record['train_loss']:.4f}", val=f"{record['val_loss']:.4f}")
            state["step"] = step
            if step % lm.checkpoint_every == 0 or step == lm.max_steps:
                save_checkpoint(model, step, {"fingerprint": fp, "optimizer": optimizer.state_dict(),
                                              "rng": rng_states(device), "state": state}, lm.keep_checkpoints)

        batches.close()  # stops the loader's workers
        best_model = LlamaForCausalLM(model.config)
        best_model.load_state_dict(state["best"]["model"])
        metrics = write_outputs(state, best_model)
        run.log_artifact(OUT_DIR / "metrics.json")
        run.log_artifact(OUT_DIR / "history.csv")
        run.log_outputs([MODEL_DIR, CHECKPOINTS, OUT_DIR / "metrics.json", OUT_DIR / "history.csv"])
        version = register_if_better(run.log_torch_model(best_model), REGISTERED_MODEL, "val_loss",
                                     metrics["best_val_loss"])
        run.set_tags({"champion": version is not None})
        print(f"best val loss {metrics['best_val_loss']:.4f} at step {metrics['best_step']}; "
              + (f"registered {REGISTERED_MODEL} v{version.version} as champion" if version else
                 "the current champion stays"))


def write_outputs(state: dict, best_model: LlamaForCausalLM) -> dict:
    """artifacts/lm/model (the best weights), metrics.json and history.csv; returns the metrics."""
    with atomic_dir(MODEL_DIR) as tmp:
        best_model.save_pretrained(tmp)
    history = pd.DataFrame(state["history"])
    evaluated = history.dropna(subset=["val_loss"])
    metrics = {
        "best_val_loss": state["best"]["val_loss"],
        "best_step": state["best"]["step"],
        "final_train_loss": float(history.train_loss.tail(LOG_EVERY).mean()),  # a single batch is noisy
        "final_val_loss": float(evaluated.val_loss.iloc[-1]),
        "tokens_per_s": float(history.tokens.sum() / history.seconds.sum()),  # training steps only, no evals
    }
    write_json(OUT_DIR / "metrics.json", metrics)
    history["tokens_per_s"] = history.tokens / history.seconds
    with atomic_path(OUT_DIR / "history.csv") as tmp:
        history[["step", "train_loss", "val_loss", "lr", "grad_norm", "tokens_per_s"]].to_csv(tmp, index=False)
    return metrics

