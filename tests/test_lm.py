"""Stages lm_train and lm_eval on tiny synthetic shards written here, checked against independent computations."""

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
from labpipe.config import load_params
from labpipe.files import sha256_file
from labpipe.hmm import HMM
from labpipe.lm import data
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
    list_checkpoints,
    parameter_groups,
    resume,
    run_train,
    save_checkpoint,
)
from labpipe.synth.manifest import MANIFEST, Shard, ShardError, load_manifest, write_manifest
from labpipe.text.stages import LINE

HMM_PATH = Path("artifacts/hmm/model.pt")
SHARDS = Path("artifacts/synth/shards")
TINY_LM = {"hidden_size": 16, "layers": 1, "heads": 2, "intermediate_size": 32, "context_length": 16,
           "vocab_size": 0, "batch_size": 8, "lr": 1.0e-2, "weight_decay": 0.1, "warmup_steps": 4, "max_steps": 20,
           "min_lr_ratio": 0.1, "grad_clip": 1.0, "eval_every": 5, "eval_sequences": 16, "checkpoint_every": 5,
           "keep_checkpoints": 0, "num_workers": 0, "compile": False, "seed": 0, "device": "cpu"}


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
    return write_params(directory, {**repo_params, "lm": {**TINY_LM, **lm}})


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
    uninterrupted = list(itertools.islice(training_batches(train, 8, seed=1, num_workers=0), 3 * per_epoch))
    resumed = list(itertools.islice(training_batches(train, 8, seed=1, num_workers=0, start_step=10),
                                    3 * per_epoch - 10))
    assert len(uninterrupted[per_epoch - 1]) == 4
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


def test_learning_rate_warms_up_linearly_then_decays_by_a_cosine(tmp_path, repo_params):
    lm = load_params(lm_project(tmp_path, repo_params, lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)).lm
    hand = {1: 0.1, 5: 0.5, 10: 1.0, 35: 0.1 + 0.9 * (1 + math.cos(math.pi / 4)) / 2, 60: 0.55, 110: 0.1}
    for step, value in hand.items():
        assert learning_rate(step, lm) == pytest.approx(value, rel=1e-12), step
    no_warmup = load_params(lm_project(tmp_path, repo_params, lr=2.0, warmup_steps=0, max_steps=4,
                                       min_lr_ratio=0.0)).lm
    expected = [1 + math.cos(math.pi * s / 4) for s in range(1, 5)]  # 2 * (1 + cos(pi * progress)) / 2
    assert [learning_rate(s, no_warmup) for s in range(1, 5)] == pytest.approx(expected, abs=1e-15)


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
    assert [p.name for p in list_checkpoints()] == [f"step_{s:08d}" for s in steps]
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
    final = LlamaForCausalLM.from_pretrained(list_checkpoints()[-1])
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
    assert float(champion.tags["metric.val_loss"]) == pytest.approx(metrics["best_val_loss"])
    assert {m.step for m in client.get_metric_history(run.info.run_id, "val_loss")} == set(steps)
    for name in ("train_loss", "lr", "tokens_per_s", "grad_norm"):
        assert {m.step for m in client.get_metric_history(run.info.run_id, name)} == {10, 20}, name

    # lm_eval reads the best model: its mean LM cross-entropy is lm_train's best val loss (same rows, positions)
    run_eval(params)
    evaluation = json.loads((EVAL_DIR / "metrics.json").read_text())
    assert evaluation["lm_ce"] == pytest.approx(metrics["best_val_loss"], rel=1e-5)


def test_checkpoints_keep_the_newest_and_another_fingerprint_starts_afresh(project, tmp_path, repo_params):
    model = build_model(load_params(lm_project(tmp_path, repo_params)).lm, vocab_size=5)
    for step in (3, 6, 9):
        save_checkpoint(model, step, {"fingerprint": "a", "state": {"step": step}}, keep=2)
    assert [p.name for p in list_checkpoints()] == ["step_00000006", "step_00000009"]
    path, saved = resume("a")
    assert path.name == "step_00000009" and saved["state"]["step"] == 9
    assert resume("b") is None and not CHECKPOINTS.exists()


KILL_AT_STEP_13 = """
import os, signal, sys
import labpipe.lm.train as train
real = train.learning_rate

def learning_rate(step, lm):
    if step == 13:  # SIGKILL in epoch 1 (12 steps per epoch), after checkpoints 5 and 10
        os.kill(os.getpid(), signal.SIGKILL)
    return real(step, lm)

train.learning_rate = learning_rate
from labpipe.cli import main
sys.exit(main(["lm-train"]))
"""


def labpipe_process(directory: Path, script: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script], cwd=directory, capture_output=True, text=True, timeout=300)


def test_a_killed_training_resumes_to_the_same_weights_in_the_same_run(project):
    directory, repo_params = project
    write_dataset(HMM.random(3, 5, seed=1))
    lm_project(directory, repo_params, num_workers=2)  # killed with its loader's workers alive
    run_train(load_params("params.yaml"))
    reference = LlamaForCausalLM.from_pretrained(CHECKPOINTS / "step_00000020").state_dict()
    reference_history = pd.read_csv(OUT_DIR / "history.csv")
    for path in list_checkpoints():
        os.rename(path, path.with_name("reference_" + path.name))  # out of the resume's sight

    killed = labpipe_process(directory, KILL_AT_STEP_13)
    assert killed.returncode == -9, killed.stderr
    assert [p.name for p in list_checkpoints()] == ["step_00000005", "step_00000010"]
    run_id = torch.load(CHECKPOINTS / "step_00000010/trainer_state.pt", weights_only=False)["state"]["run_id"]
    resumed = labpipe_process(directory, "import sys; from labpipe.cli import main; sys.exit(main(['lm-train']))")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from artifacts/lm/checkpoints/step_00000010 (step 10)" in resumed.stdout

    final = LlamaForCausalLM.from_pretrained(CHECKPOINTS / "step_00000020").state_dict()
    assert all(torch.equal(reference[k], final[k]) for k in reference)
    pd.testing.assert_frame_equal(reference_history[["step", "train_loss", "val_loss", "lr"]],
                                  pd.read_csv(OUT_DIR / "history.csv")[["step", "train_loss", "val_loss", "lr"]])
    client = MlflowClient()
    assert {m.step for m in client.get_metric_history(run_id, "val_loss")} == {5, 10, 15, 20}
    assert client.get_run(run_id).info.status == "FINISHED"
    runs = client.search_runs([client.get_experiment_by_name(LINE).experiment_id], "tags.`labpipe.stage` = 'lm_train'")
    assert len(runs) == 2  # the uninterrupted reference and the killed-and-resumed one


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
