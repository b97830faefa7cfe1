"""Stages lm_train and lm_eval on tiny synthetic shards written here, checked against independent computations."""

import copy
import itertools
import json
import math
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from transformers import LlamaForCausalLM

from conftest import write_params
from labpipe import registry
from labpipe.checkpoint import SUPERSEDED, TRAINER_STATE, UNREADABLE, Checkpoints
from labpipe.config import load_params
from labpipe.errors import InputError
from labpipe.files import sha256_file
from labpipe.hmm import HMM
from labpipe.lm import data
from labpipe.lm import train as lm_train
from labpipe.lm.data import ShardDataset, epoch_loader, shards_read, steps_per_epoch, training_batches
from labpipe.lm.evaluate import OUT_DIR as EVAL_DIR
from labpipe.lm.evaluate import run_eval
from labpipe.lm.train import (
    CHECKPOINTS,
    MODEL_DIR,
    OUT_DIR,
    build_model,
    causal_lm_loss,
    learning_rate,
    parameter_groups,
    run_train,
)
from labpipe.synth.manifest import MANIFEST, Shard, ShardError, load_manifest, write_manifest

LINE = registry.line_of("lm_train").experiment
HMM_PATH = Path("artifacts/hmm/model.pt")
SHARDS = Path("artifacts/synth/shards")
TINY_LM = {"hidden_size": 16, "layers": 1, "heads": 2, "intermediate_size": 32, "context_length": 16,
           "vocab_size": 0, "batch_size": 8, "lr": 1.0e-2, "adam_beta1": 0.9, "adam_beta2": 0.95,
           "weight_decay": 0.1, "warmup_steps": 4, "decay_steps": 20, "max_steps": 20, "min_lr_ratio": 0.1,
           "grad_clip": 1.0, "log_every": 10, "eval_every": 5, "eval_sequences": 16, "checkpoint_every": 5,
           "keep_checkpoints": 0, "num_workers": 0, "compile": False, "seed": 0, "init_from": "", "device": "cpu"}


def store() -> Checkpoints:
    return Checkpoints(CHECKPOINTS, "step", directories=True)


# ---- tiny synthetic data, written without the synth stage ------------------------------------------------------


def stationary(transition: np.ndarray) -> np.ndarray:
    """The left eigenvector of eigenvalue 1, normalized."""
    values, vectors = np.linalg.eig(transition.T)
    pi = np.real(vectors[:, np.argmin(np.abs(values - 1))])
    return pi / pi.sum()


def hmm_arrays(hmm: HMM, start: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(initial law, transition without ends, emission) as numpy arrays, by hand."""
    transition = (hmm.transition / (1 - hmm.end)[:, None]).numpy()
    initial = stationary(transition) if start == "stationary" else hmm.start.numpy()
    return initial, transition, hmm.emission.numpy()


def sample_rows(hmm: HMM, start: str, rows: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """Rows of the HMM conditioned never to end, by a plain loop: draw a state, emit, move."""
    initial, transition, emission = hmm_arrays(hmm, start)
    out = np.empty((rows, length), dtype=np.int64)
    for r in range(rows):
        state = rng.choice(len(initial), p=initial)
        for t in range(length):
            out[r, t] = rng.choice(emission.shape[1], p=emission[state])
            state = rng.choice(len(initial), p=transition[state])
    return out


def write_dataset(hmm: HMM | None = None, vocab: int = 5, length: int = 12, rows: int = 32, train_shards: int = 3,
                  val_shards: int = 1, block: int = 8, permute: bool = False, start: str = "stationary",
                  seed: int = 0) -> None:
    """An HMM checkpoint, shards and their manifest as stage synth would write them (random tokens when no
    HMM is given: enough for the loader)."""
    rng = np.random.default_rng(seed)
    if hmm is not None:
        HMM_PATH.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"hmm": hmm.state_dict()}, HMM_PATH)
    SHARDS.mkdir(parents=True, exist_ok=True)
    shards = []
    for split, count in (("train", train_shards), ("val", val_shards)):
        for index in range(count):
            tokens = (sample_rows(hmm, start, rows, length, rng) if hmm is not None
                      else rng.integers(0, vocab, size=(rows, length)))
            permutation_seeds = [int(s) for s in rng.integers(0, 2**31, size=-(-rows // block))] if permute else []
            for b, perm_seed in enumerate(permutation_seeds):  # block b emits perm[x] for the HMM's symbol x
                block_rows = slice(b * block, (b + 1) * block)
                tokens[block_rows] = np.random.default_rng(perm_seed).permutation(vocab)[tokens[block_rows]]
            file = f"{split}_{index:05d}.bin"
            tokens.astype("<u2").tofile(SHARDS / file)
            shards.append(Shard(split, index, file, rows * length, rows, sha256_file(SHARDS / file), seed + index,
                                tuple(permutation_seeds)))
    header = {"dtype": "<u2", "vocab_size": vocab, "seq_length": length, "sequences_per_shard": rows,
              "start": start, "permute_emissions": permute, "block_sequences": block,
              "hmm": {"path": str(HMM_PATH), "sha256": sha256_file(HMM_PATH) if hmm is not None else "",
                      "hidden_states": hmm.n_states if hmm is not None else 0},
              "out_dir": str(SHARDS)}
    write_manifest(MANIFEST, header, shards)


def shard_rows(split: str) -> np.ndarray:
    """Every row of a split, read with np.fromfile in manifest order."""
    manifest = json.loads(MANIFEST.read_text())
    return np.concatenate([np.fromfile(SHARDS / s["file"], dtype="<u2").reshape(-1, manifest["seq_length"])
                           for s in manifest["shards"] if s["split"] == split]).astype(np.int64)


def lm_project(directory: Path, repo_params: dict, **lm) -> Path:
    return write_params(directory, {**repo_params, "lm": {**repo_params["lm"], **TINY_LM, **lm}})


def make_lm_project(directory: Path, repo_params: dict, **lm_overrides) -> None:
    """A project in `directory` ready for `python -m labpipe lm-train` (a few seconds on a CPU): a tiny random
    HMM as hmm_train's model.pt, the synth stage run on it (2 train shards of 32 rows of 12 tokens, one val
    shard: 8 steps per epoch), and params.yaml with a tiny Llama trained for 24 steps (checkpoints every 4,
    evaluations every 8), `lm_overrides` on top of the lm section. MLflow: $MLFLOW_TRACKING_URI (the caller's)."""
    from labpipe.synth.generate import run_synth

    params = copy.deepcopy(repo_params)
    params["synth"].update({"seq_length": 12, "sequences_per_shard": 32, "train_shards": 2, "val_shards": 1,
                            "block_sequences": 16, "permute_emissions": False, "workers": 1})
    params["lm"].update({**TINY_LM, "max_steps": 24, "decay_steps": 24, "warmup_steps": 4, "checkpoint_every": 4,
                         "eval_every": 8, "log_every": 4, "keep_checkpoints": 0, "num_workers": 0, "device": "cpu",
                         **lm_overrides})
    cwd = os.getcwd()
    os.chdir(directory)
    try:
        hmm_path = Path(params["synth"]["hmm_checkpoint"])
        hmm_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"hmm": HMM.random(3, 5, seed=0).state_dict()}, hmm_path)
        write_params(directory, params)
        run_synth(load_params(directory / "params.yaml"))
    finally:
        os.chdir(cwd)


# ---- the dataset and its epoch order ----------------------------------------------------------------------------


def test_the_dataset_returns_exactly_the_shard_rows(project, monkeypatch):
    monkeypatch.setattr(data, "OPEN_SHARDS", 2)
    write_dataset(rows=10, train_shards=3)
    train = ShardDataset(load_manifest(), "train")
    expected = shard_rows("train")
    assert len(train) == 30
    got = torch.stack([train[i] for i in [*range(len(train)), *range(len(train))][::-1]])  # reopens shards
    assert got.dtype == torch.int64
    np.testing.assert_array_equal(got.numpy(), np.concatenate([expected, expected])[::-1])
    assert sorted(train._memmaps) == [0, 1]  # the two most recently read stay open
    with pytest.raises(IndexError):
        train[30]


def as_multiset(rows: np.ndarray) -> list[tuple]:
    return sorted(map(tuple, rows.tolist()))


@pytest.mark.parametrize("workers", [0, 2])
def test_every_row_once_per_epoch_in_a_seeded_order(project, workers):
    write_dataset(rows=20, train_shards=3)
    train = ShardDataset(load_manifest(), "train")
    expected = shard_rows("train")

    def epoch(seed: int) -> np.ndarray:
        return torch.cat(list(epoch_loader(train, batch_size=7, seed=seed, num_workers=workers))).numpy()

    first = epoch(5)
    assert as_multiset(first) == as_multiset(expected)  # each row exactly once (as a multiset), 60 = 8 x 7 + 4
    assert not np.array_equal(first, expected)  # shuffled
    np.testing.assert_array_equal(epoch(5), first)  # seeded
    assert not np.array_equal(epoch(6), first)
    # the workers opened their own memmaps; the dataset in this process never did, and pickles without data
    assert (not train._memmaps) == bool(workers)
    assert len(pickle.dumps(train)) < 4000


def test_a_resumed_stream_continues_with_the_same_batches(project):
    write_dataset(rows=20, train_shards=3)
    train = ShardDataset(load_manifest(), "train")
    per_epoch = steps_per_epoch(train, 8)  # 60 rows: 7 full batches and one of 4
    stream = list(itertools.islice(training_batches(train, 8, seed=1, num_workers=0), 3 * per_epoch))
    uninterrupted = [rows for rows, _ in stream]
    resumed = [rows for rows, _ in itertools.islice(training_batches(train, 8, seed=1, num_workers=0, start_step=10),
                                                    3 * per_epoch - 10)]
    assert len(uninterrupted[per_epoch - 1]) == 4
    assert [step_rows for _, step_rows in stream] == [len(rows) for rows in uninterrupted]
    for a, b in zip(uninterrupted[10:], resumed, strict=True):
        assert torch.equal(a, b)
    # epoch 1 is epoch_loader(seed + 1)
    assert torch.equal(torch.cat(uninterrupted[per_epoch : 2 * per_epoch]),
                       torch.cat(list(epoch_loader(train, 8, seed=2))))


def test_a_large_split_is_shuffled_within_windows_of_shards(project, monkeypatch):
    monkeypatch.setattr(data, "WINDOW_ROWS", 40)  # 5 shards of 20 rows: windows of 2, 2 and 1 shards
    write_dataset(rows=20, train_shards=5)
    train = ShardDataset(load_manifest(), "train")
    rows = shard_rows("train")
    order = torch.cat(list(epoch_loader(train, 8, seed=3))).numpy()
    assert as_multiset(order) == as_multiset(rows)
    owner = {tuple(r): i // 20 for i, r in enumerate(rows.tolist())}
    shard_of_position = [owner[tuple(r)] for r in order.tolist()]
    windows = [set(shard_of_position[:40]), set(shard_of_position[40:80]), set(shard_of_position[80:])]
    assert [len(w) for w in windows] == [2, 2, 1] and set.union(*windows) == set(range(5))
    for steps in (1, 5, 6, 10, 11, 13):  # the shards worth verifying: those of every window the batches reach
        reached = set(shard_of_position[: steps * 8])
        assert set(shards_read(train, 8, seed=3, steps=steps)) == set().union(*(w for w in windows if w & reached))


# ---- schedule, optimizer groups, loss -------------------------------------------------------------------------


def test_learning_rate_warms_up_linearly_then_decays_by_a_cosine_to_a_floor(tmp_path, repo_params):
    lm = load_params(lm_project(tmp_path, repo_params, lr=1.0, warmup_steps=10, decay_steps=110, max_steps=300,
                                min_lr_ratio=0.1)).lm
    hand = {1: 0.1, 5: 0.5, 10: 1.0, 35: 0.1 + 0.9 * (1 + math.cos(math.pi / 4)) / 2, 60: 0.55, 110: 0.1,
            111: 0.1, 200: 0.1, 300: 0.1}  # past decay_steps: the floor, lr * min_lr_ratio
    for step, value in hand.items():
        assert learning_rate(step, lm) == pytest.approx(value, rel=1e-12), step
    assert all(learning_rate(s, lm) == 0.1 for s in range(110, 400))  # exactly, however long the run goes on
    # max_steps, the run length, is no part of the schedule
    longer = load_params(lm_project(tmp_path, repo_params, lr=1.0, warmup_steps=10, decay_steps=110, max_steps=110,
                                    min_lr_ratio=0.1)).lm
    assert [learning_rate(s, longer) for s in range(1, 301)] == [learning_rate(s, lm) for s in range(1, 301)]
    no_warmup = load_params(lm_project(tmp_path, repo_params, lr=2.0, warmup_steps=0, decay_steps=4, max_steps=8,
                                       min_lr_ratio=0.0)).lm
    expected = [1 + math.cos(math.pi * s / 4) for s in range(1, 5)]  # 2 * (1 + cos(pi * progress)) / 2
    assert [learning_rate(s, no_warmup) for s in range(1, 5)] == pytest.approx(expected, abs=1e-15)
    assert [learning_rate(s, no_warmup) for s in range(4, 9)] == [0.0] * 5
    only_warmup = load_params(lm_project(tmp_path, repo_params, lr=1.0, warmup_steps=4, decay_steps=4, max_steps=6,
                                         min_lr_ratio=0.5)).lm
    assert [learning_rate(s, only_warmup) for s in range(1, 7)] == [0.25, 0.5, 0.75, 1.0, 0.5, 0.5]


def test_weight_decay_on_matrices_only(tmp_path, repo_params):
    lm = load_params(lm_project(tmp_path, repo_params, layers=2)).lm
    model = build_model(lm, vocab_size=7)
    decayed, plain = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert sorted(names[id(p)] for p in plain["params"]) == sorted(
        n for n in names.values() if n.endswith("norm.weight"))
    assert {names[id(p)] for p in decayed["params"]} >= {"model.embed_tokens.weight", "lm_head.weight",
                                                         "model.layers.1.mlp.down_proj.weight"}
    assert len(decayed["params"]) + len(plain["params"]) == len(names)
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.intermediate_size,
            config.max_position_embeddings, config.vocab_size) == (16, 2, 2, 32, 16, 7)


def hand_cross_entropy(model: LlamaForCausalLM, tokens: torch.Tensor) -> torch.Tensor:
    """(B, L-1): -log softmax(logits at t-1)[x_t], shifted and gathered by hand."""
    with torch.no_grad():
        logits = model(input_ids=tokens).logits
    log_probs = logits[:, :-1].log_softmax(-1)
    return -log_probs.gather(2, tokens[:, 1:, None])[:, :, 0]


# ---- lm_train --------------------------------------------------------------------------------------------------


def test_lm_train_writes_checkpoints_the_best_model_metrics_and_a_champion(project):
    directory, repo_params = project
    write_dataset(HMM.random(3, 5, seed=0))
    lm_project(directory, repo_params)
    params = load_params("params.yaml")
    run_train(params)

    steps = [5, 10, 15, 20]
    assert [p.name for p in store().all()] == [f"step_{s:08d}" for s in steps]
    history = pd.read_csv(OUT_DIR / "history.csv")
    assert list(history.step) == list(range(1, 21))
    assert list(history.dropna(subset=["val_loss"]).step) == steps
    np.testing.assert_allclose(history.lr, [learning_rate(s, params.lm) for s in range(1, 21)])
    metrics = json.loads((OUT_DIR / "metrics.json").read_text())
    assert metrics["best_val_loss"] == pytest.approx(history.val_loss.min())
    assert metrics["best_step"] == int(history.step[history.val_loss.idxmin()])
    assert metrics["final_val_loss"] == pytest.approx(history.val_loss.iloc[-1])
    assert metrics["tokens_per_s"] > 0

    # the loss of step 1: the seeded initial model on the first batch of epoch 0, by hand
    torch.manual_seed(0)
    initial = build_model(params.lm, vocab_size=5)
    train = ShardDataset(load_manifest(), "train")
    first_batch = next(iter(epoch_loader(train, 8, seed=0)))
    assert history.train_loss[0] == pytest.approx(hand_cross_entropy(initial, first_batch).mean().item(), rel=1e-5)
    assert causal_lm_loss(initial, first_batch).item() == pytest.approx(history.train_loss[0], rel=1e-6)

    # the final val loss: the last checkpoint on the first 16 val rows (read with np.fromfile), by hand
    final = LlamaForCausalLM.from_pretrained(store().all()[-1])
    val_rows = torch.from_numpy(shard_rows("val")[:16])
    assert metrics["final_val_loss"] == pytest.approx(hand_cross_entropy(final, val_rows).mean().item(), rel=1e-5)
    # artifacts/lm/model holds the best step's weights
    best = LlamaForCausalLM.from_pretrained(MODEL_DIR).state_dict()
    at_best = LlamaForCausalLM.from_pretrained(CHECKPOINTS / f"step_{metrics['best_step']:08d}").state_dict()
    assert all(torch.equal(best[k], at_best[k]) for k in best)

    client = MlflowClient()
    champion = client.get_model_version_by_alias("lm-synthetic", "champion")
    run = client.get_run(champion.run_id)
    assert run.data.tags["labpipe.stage"] == "lm_train" and run.data.params["lm.hidden_size"] == "16"
    assert "labpipe.init_from" not in run.data.tags and run.data.tags["champion"] == "True"
    assert float(champion.tags["metric.val_loss"]) == pytest.approx(metrics["best_val_loss"])
    assert {m.step for m in client.get_metric_history(run.info.run_id, "val_loss")} == set(steps)
    for name in ("train_loss", "lr", "tokens_per_s", "grad_norm", "tokens_seen", "tokens_per_parameter"):
        assert {m.step for m in client.get_metric_history(run.info.run_id, name)} == {10, 20}, name

    # the token budget, by hand: every row read once per epoch in batches of 8, the last one smaller
    rows, length = shard_rows("train").shape
    per_step = [min(8, rows - 8 * (s % -(-rows // 8))) for s in range(20)]
    seen = [sum(per_step[:n]) * length for n in (10, 20)]
    parameters = sum(t.numel() for t in best.values())
    assert metrics["tokens_seen"] == seen[-1]
    assert metrics["tokens_per_parameter"] == pytest.approx(seen[-1] / parameters)
    logged = client.get_metric_history(run.info.run_id, "tokens_seen")
    assert sorted((m.step, m.value) for m in logged) == [(10, seen[0]), (20, seen[1])]

    # lm_eval reads the best model: its mean LM cross-entropy is lm_train's best val loss (same rows, positions)
    run_eval(params)
    evaluation = json.loads((EVAL_DIR / "metrics.json").read_text())
    assert evaluation["lm_ce"] == pytest.approx(metrics["best_val_loss"], rel=1e-5)


def test_checkpoints_keep_the_newest_and_another_trajectory_starts_afresh(project, capsys):
    directory, repo_params = project
    write_dataset(HMM.random(3, 5, seed=0))
    lm_project(directory, repo_params, max_steps=9, decay_steps=9, checkpoint_every=3, eval_every=3,
               keep_checkpoints=2)
    run_train(load_params("params.yaml"))
    kept = [p.name for p in store().all()]
    assert kept == ["step_00000006", "step_00000009"] and [p.name for p in store().resumable()] == kept
    fingerprint = json.loads((CHECKPOINTS / "run.json").read_text())["fingerprint"]
    weights = {name: sha256_file(CHECKPOINTS / name / "model.safetensors") for name in kept}

    capsys.readouterr()
    run_train(load_params("params.yaml", ["lm.seed=1"]))  # another trajectory: not resumed, and nothing deleted
    out, err = capsys.readouterr()
    assert "resuming from" not in out and f"moved to {CHECKPOINTS / SUPERSEDED / fingerprint}" in err
    assert [p.name for p in store().all()] == kept
    assert {name: sha256_file(CHECKPOINTS / SUPERSEDED / fingerprint / name / "model.safetensors")
            for name in kept} == weights
    assert all(sha256_file(CHECKPOINTS / name / "model.safetensors") != weights[name] for name in kept)
    assert pd.read_csv(OUT_DIR / "history.csv").step.tolist() == list(range(1, 10))  # trained from step 1


def step_dirs() -> list[str]:
    return [p.name for p in store().all()]


def read_run_id(path: Path) -> str:
    return torch.load(path / TRAINER_STATE, weights_only=False)["state"]["run_id"]


def test_raising_max_steps_extends_a_finished_run_to_a_straight_runs_weights_in_the_same_mlflow_run(
        tmp_path, mlflow_store, repo_params, monkeypatch, capsys):
    straight, extended = tmp_path / "straight", tmp_path / "extended"
    for directory in (straight, extended):
        directory.mkdir()
        make_lm_project(directory, repo_params)  # 24 steps, decay_steps 24
    monkeypatch.chdir(straight)
    run_train(load_params("params.yaml"))
    monkeypatch.chdir(extended)
    run_train(load_params("params.yaml", ["lm.max_steps=12"]))
    assert step_dirs() == ["step_00000004", "step_00000008", "step_00000012"]
    first_run = read_run_id(CHECKPOINTS / "step_00000012")
    assert MlflowClient().get_run(first_run).info.status == "FINISHED"
    capsys.readouterr()
    run_train(load_params("params.yaml"))
    assert "resuming from artifacts/lm/checkpoints/step_00000012 (step 12)" in capsys.readouterr().out

    names = [f"step_{s:08d}" for s in range(4, 25, 4)]
    assert step_dirs() == names
    for name in names:  # every revision, the final weights among them, bit for bit
        assert sha256_file(CHECKPOINTS / name / "model.safetensors") == sha256_file(
            straight / CHECKPOINTS / name / "model.safetensors"), name
    final = LlamaForCausalLM.from_pretrained(CHECKPOINTS / "step_00000024").state_dict()
    reference = LlamaForCausalLM.from_pretrained(straight / CHECKPOINTS / "step_00000024").state_dict()
    assert final.keys() == reference.keys() and all(torch.equal(final[k], reference[k]) for k in final)
    # the best weights and the history too: the evaluation at step 12, made only because the shorter run ended
    # there, is no longer part of either (tokens_per_s, a timing, differs between any two runs)
    assert sha256_file(MODEL_DIR / "model.safetensors") == sha256_file(straight / MODEL_DIR / "model.safetensors")
    columns = ["step", "train_loss", "val_loss", "lr", "grad_norm"]
    pd.testing.assert_frame_equal(pd.read_csv(OUT_DIR / "history.csv")[columns],
                                  pd.read_csv(straight / OUT_DIR / "history.csv")[columns])
    assert pd.read_csv(OUT_DIR / "history.csv").dropna(subset=["val_loss"]).step.tolist() == [8, 16, 24]
    metrics, straight_metrics = (json.loads((d / OUT_DIR / "metrics.json").read_text()) for d in (extended, straight))
    for key in ("best_val_loss", "best_step", "final_train_loss", "final_val_loss"):
        assert metrics[key] == straight_metrics[key], key

    client = MlflowClient()
    assert read_run_id(CHECKPOINTS / "step_00000024") == first_run
    run = client.get_run(first_run)
    assert run.info.status == "FINISHED" and run.data.tags["labpipe.changed.lm.max_steps"] == "12 -> 24"
    assert run.data.params["lm.max_steps"] == "12"  # as opened: MLflow params are immutable
    assert {m.step for m in client.get_metric_history(first_run, "val_loss")} == {8, 12, 16, 24}
    assert {m.step for m in client.get_metric_history(first_run, "train_loss")} == {4, 8, 12, 16, 20, 24}
    runs = client.search_runs([client.get_experiment_by_name(LINE).experiment_id], "tags.`labpipe.stage` = 'lm_train'")
    assert len(runs) == 2  # the straight one and the extended one


def test_gradient_accumulation_equals_one_pass_over_the_step_batch(project):
    """A step of 40 rows as 1 x 40, 2 x 20 and 5 x 8: the same losses and weights (96 rows: each epoch ends in a
    step of 16, split unevenly by 20)."""
    directory, repo_params = project
    write_dataset(HMM.random(3, 5, seed=0))
    losses, weights = {}, {}
    for batch, accumulate in ((40, 1), (20, 2), (8, 5)):
        lm_project(directory, repo_params, batch_size=batch, grad_accum_steps=accumulate, max_steps=7,
                   decay_steps=7, checkpoint_every=7, eval_every=7, log_every=7)
        run_train(load_params("params.yaml"))
        losses[batch] = pd.read_csv(OUT_DIR / "history.csv").train_loss.to_numpy()
        weights[batch] = LlamaForCausalLM.from_pretrained(CHECKPOINTS / "step_00000007").state_dict()
    for batch in (20, 8):
        np.testing.assert_allclose(losses[batch], losses[40], rtol=1e-5)
        for name, tensor in weights[40].items():
            torch.testing.assert_close(weights[batch][name], tensor, rtol=1e-4, atol=1e-6, msg=name)
    assert len(losses[40]) == 7 and not np.allclose(losses[40][0], losses[40][-1])  # it trained


def test_every_checkpoint_keeps_its_weights_only_the_newest_two_the_resume_state(project):
    from labpipe.dormancy.analysis import list_revisions

    directory, repo_params = project
    make_lm_project(directory, repo_params)
    run_train(load_params("params.yaml"))
    names = [f"step_{s:08d}" for s in range(4, 25, 4)]
    assert step_dirs() == names
    for name in names:  # each a published revision: a plain save_pretrained directory
        assert (CHECKPOINTS / name / "config.json").is_file() and (CHECKPOINTS / name / "model.safetensors").is_file()
        assert (CHECKPOINTS / name / TRAINER_STATE).is_file() == (name in names[-2:]), name
    assert [p.name for p in store().resumable()] == names[-2:]
    revision = LlamaForCausalLM.from_pretrained(CHECKPOINTS / names[0])
    assert revision.config.hidden_size == 16

    # what dormancy reads from the folder: the step_* revisions, not what was moved aside
    (CHECKPOINTS / SUPERSEDED / "0123456789abcdef" / "step_00000004").mkdir(parents=True)
    (CHECKPOINTS / UNREADABLE / "step_00000028").mkdir(parents=True)
    revisions = list_revisions(load_params("params.yaml").dormancy)  # dormancy.model: artifacts/lm/checkpoints
    assert [(r.name, r.step, r.source) for r in revisions] == [(n, int(n[5:]), str(CHECKPOINTS / n)) for n in names]


def test_init_from_a_previous_runs_checkpoint_starts_from_its_weights(tmp_path, mlflow_store, repo_params,
                                                                      monkeypatch):
    previous, tuned = tmp_path / "previous", tmp_path / "tuned"
    previous.mkdir()
    tuned.mkdir()
    make_lm_project(previous, repo_params, max_steps=8, decay_steps=8)
    monkeypatch.chdir(previous)
    run_train(load_params("params.yaml"))
    source = previous / CHECKPOINTS / "step_00000008"
    make_lm_project(tuned, repo_params, max_steps=4, decay_steps=4, init_from=str(source))
    monkeypatch.chdir(tuned)

    seen = []  # the weights of the first forward pass, the loss of step 1: step 0's weights

    def recording_loss(model, tokens):
        if not seen:
            seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return causal_lm_loss(model, tokens)

    monkeypatch.setattr(lm_train, "causal_lm_loss", recording_loss)
    params = load_params("params.yaml")
    run_train(params)
    loaded = LlamaForCausalLM.from_pretrained(source)
    expected = loaded.state_dict()
    assert seen[0].keys() == expected.keys() and all(torch.equal(seen[0][k], expected[k]) for k in expected)
    first_batch = next(iter(epoch_loader(ShardDataset(load_manifest(), "train"), 8, seed=0)))
    history = pd.read_csv(OUT_DIR / "history.csv")
    assert history.step.tolist() == [1, 2, 3, 4]
    assert history.train_loss[0] == pytest.approx(causal_lm_loss(loaded, first_batch).item(), rel=1e-6)
    torch.manual_seed(0)
    seeded = build_model(params.lm, vocab_size=5)  # what the run would have started from without init_from
    assert history.train_loss[0] != pytest.approx(causal_lm_loss(seeded, first_batch).item(), rel=1e-3)

    run_id = read_run_id(CHECKPOINTS / "step_00000004")
    assert MlflowClient().get_run(run_id).data.tags["labpipe.init_from"] == str(source)


# ---- lm_eval ---------------------------------------------------------------------------------------------------


def numpy_predictive(initial: np.ndarray, transition: np.ndarray, emission: np.ndarray, x: np.ndarray) -> np.ndarray:
    """p(x_t | x_<t) for every t by the textbook forward recursion: predict the state, read the symbol, filter."""
    predicted, out = initial, []
    for symbol in x:
        joint = predicted * emission[:, symbol]
        out.append(joint.sum())
        predicted = (joint / joint.sum()) @ transition
    return np.array(out)


def test_lm_eval_curves_against_a_numpy_forward_and_a_hand_count(project):
    directory, repo_params = project
    hmm = HMM.random(2, 3, seed=4)
    write_dataset(hmm, vocab=3, length=6, rows=8, train_shards=2, val_shards=2, block=3, permute=True)
    lm_project(directory, repo_params, eval_sequences=12, batch_size=5)  # 12 rows: one val shard and a half
    params = load_params("params.yaml")
    torch.manual_seed(0)
    model = build_model(params.lm, vocab_size=3)
    model.save_pretrained(MODEL_DIR)
    run_eval(params)

    curve = pd.read_csv(EVAL_DIR / "icl_curve.csv")
    assert list(curve.columns) == ["position", "lm", "bayes", "unigram", "bigram"]
    assert list(curve.position) == [1, 2, 3, 4, 5]
    rows = shard_rows("val")[:12]
    manifest = json.loads(MANIFEST.read_text())
    initial, transition, emission = hmm_arrays(hmm, "stationary")
    bayes = []
    for i, x in enumerate(rows):
        shard = manifest["shards"][2 + i // 8]  # the val shards follow the two train shards
        perm = np.random.default_rng(shard["permutation_seeds"][(i % 8) // 3]).permutation(3)
        original = np.argsort(perm)[x]  # the HMM's symbol behind each observed one
        bayes.append(-np.log(numpy_predictive(initial, transition, emission, original)))
    np.testing.assert_allclose(curve.bayes, np.mean(bayes, axis=0)[1:], rtol=1e-9)

    counts = np.bincount(shard_rows("train").reshape(-1), minlength=3)
    eps = params.hmm.eps
    unigram = eps + (1 - 3 * eps) * counts / counts.sum()
    np.testing.assert_allclose(curve.unigram, -np.log(unigram[rows[:, 1:]]).mean(0), rtol=1e-9)
    tokens = torch.from_numpy(rows)
    np.testing.assert_allclose(curve.lm, hand_cross_entropy(model, tokens).mean(0).numpy(), rtol=1e-5)

    metrics = json.loads((EVAL_DIR / "metrics.json").read_text())
    assert metrics["lm_ce"] == pytest.approx(causal_lm_loss(model, tokens).item(), rel=1e-5)  # = lm_train's val loss
    assert metrics["lm_excess_over_bayes"] == pytest.approx(metrics["lm_ce"] - metrics["bayes_ce"])
    assert metrics["sequences"] == 12 and (EVAL_DIR / "icl_curve.png").stat().st_size > 0
    run = MlflowClient().search_runs([MlflowClient().get_experiment_by_name(LINE).experiment_id],
                                     "tags.`labpipe.stage` = 'lm_eval'")[0]
    assert run.data.metrics["bayes_ce"] == pytest.approx(metrics["bayes_ce"])
    assert len(MlflowClient().get_metric_history(run.info.run_id, "icl/lm")) == 5


# ---- bad input: a clear error before anything is trained or logged -----------------------------------------------


def corrupt_a_train_shard() -> None:
    path = SHARDS / "train_00001.bin"
    data = bytearray(path.read_bytes())
    data[3] ^= 1
    path.write_bytes(bytes(data))


BAD_INPUTS = {
    "corrupt shard": ({}, corrupt_a_train_shard, ShardError, r"shard .*train_00001.bin is corrupt: sha256"),
    "missing shard": ({}, lambda: (SHARDS / "val_00000.bin").unlink(), ShardError,
                      r"shard .*val_00000.bin listed in .*manifest.json is missing"),
    "vocabulary": ({"vocab_size": 4}, None, ValueError,
                   r"lm.vocab_size=4 is smaller than the vocabulary of the synthetic data \(5 symbols"),
    "context": ({"context_length": 8}, None, ValueError,
                r"sequences have 12 tokens \(synth.seq_length, .*\), more than the model's context: "
                r"lm.context_length=8"),
    "init weights": ({"init_from": "elsewhere/step_00000008"}, None, InputError,
                     r"lm.init_from=elsewhere/step_00000008: cannot load weights"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_stops_before_training(project, case):
    directory, repo_params = project
    lm, damage, error, message = BAD_INPUTS[case]
    write_dataset()
    lm_project(directory, repo_params, **lm)
    if damage:
        damage()
    with pytest.raises(error, match=message):
        run_train(load_params("params.yaml"))
    assert not OUT_DIR.exists()
    experiment = MlflowClient().get_experiment_by_name(LINE)
    assert experiment is None or not MlflowClient().search_runs([experiment.experiment_id])


def test_the_cli_exits_with_2_for_bad_params_and_1_for_a_corrupt_shard(project):
    directory, repo_params = project
    write_dataset()
    lm_project(directory, repo_params)
    corrupt_a_train_shard()  # found only after the params' checks have passed
    cases = {"corrupt shard": ([], 1), "vocabulary": (["--set", "lm.vocab_size=4"], 2),
             "context": (["--set", "lm.context_length=8"], 2)}
    # all three at once: most of each run is importing torch and transformers
    running = {case: subprocess.Popen([sys.executable, "-m", "labpipe", "lm-train", *flags], cwd=directory,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
               for case, (flags, _) in cases.items()}
    for case, process in running.items():
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == cases[case][1], (case, stderr)
        assert re.search(r"^labpipe lm-train: error: .*" + BAD_INPUTS[case][3], stderr, re.MULTILINE), stderr
