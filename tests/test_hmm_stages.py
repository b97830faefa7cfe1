"""Stages corpus -> tokenize -> hmm_train -> hmm_eval, checked against independent computations."""

import collections
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from conftest import write_params
from labpipe import checkpoint
from labpipe.config import load_params
from labpipe.files import sha256_file
from labpipe.hmm import HMM
from labpipe.hmm.evaluate import Baselines, evaluate, run_eval
from labpipe.hmm.train import CHECKPOINTS, OUT_DIR, read_sequences, run_train
from labpipe.text import load_stories, read_token_file
from labpipe.text.stages import LINE, TOKEN_STATS, corpus_file, run_corpus, run_tokenize, token_dir
from test_hmm_core import brute_next_token_probs, random_sequences

# ---- evaluation against brute force and hand counts ----------------------------------------------------------


def test_baselines_match_a_hand_count():
    sequences = [np.array([1, 2, 0]), np.array([2, 2, 0]), np.array([1, 0])]
    baselines = Baselines.fit(sequences, vocab_size=3, eps=0.0)
    # tokens: 0 x3, 1 x2, 2 x3; first tokens: 1 x2, 2 x1; pairs: 1>2, 2>0, 2>2, 2>0, 1>0 (none from 0)
    np.testing.assert_allclose(baselines.unigram.exp(), [3 / 8, 2 / 8, 3 / 8])
    np.testing.assert_allclose(baselines.first.exp(), [0, 2 / 3, 1 / 3])
    np.testing.assert_allclose(baselines.bigram.exp(), [[1 / 3, 1 / 3, 1 / 3], [1 / 2, 0, 1 / 2], [2 / 3, 0, 1 / 3]])
    floored = Baselines.fit(sequences, vocab_size=3, eps=0.01)
    np.testing.assert_allclose(floored.bigram.exp()[1], [0.01 + 0.97 / 2, 0.01, 0.01 + 0.97 / 2])

    tokens = torch.tensor([[1, 2, 0]])
    bigram = baselines.log_probs("bigram", tokens).exp()[0]
    np.testing.assert_allclose(bigram, [[0, 2 / 3, 1 / 3], [1 / 2, 0, 1 / 2], [2 / 3, 0, 1 / 3]])


def test_final_token_cross_entropy_and_kl_match_brute_force():
    hmm = HMM.random(3, 4, seed=21)
    rng = np.random.default_rng(21)
    test = random_sequences(rng, 9, 5, 4)
    test += [test[0].copy(), test[0].copy(), test[3].copy()]  # duplicated sequences
    baselines = Baselines.fit(random_sequences(rng, 30, 5, 4), vocab_size=4, eps=1e-6)
    result = evaluate(hmm, baselines, test, batch_size=5)

    unigram, first, bigram = (t.exp().numpy() for t in (baselines.unigram, baselines.first, baselines.bigram))
    for i, x in enumerate(test):
        p_hmm = brute_next_token_probs(hmm, x[:-1])
        p_bigram = bigram[x[-2]] if len(x) > 1 else first
        expected_ce = {"hmm": -math.log(p_hmm[x[-1]]), "uniform": math.log(4), "unigram": -math.log(unigram[x[-1]]),
                       "bigram": -math.log(p_bigram[x[-1]])}
        for name, value in expected_ce.items():
            assert result.final_ce[name][i] == pytest.approx(value, rel=1e-10), (i, name)
        for name, p in (("uniform", np.full(4, 0.25)), ("unigram", unigram), ("bigram", p_bigram)):
            assert result.final_kl[name][i] == pytest.approx(np.sum(p_hmm * np.log(p_hmm / p)), rel=1e-9, abs=1e-12)

    counts = collections.Counter(x.tobytes() for x in test)
    np.testing.assert_array_equal(result.unique, [counts[x.tobytes()] == 1 for x in test])
    summary = result.summary()
    assert summary["sequences"] == {"overall": 12, "unique": int(result.unique.sum()),
                                    "duplicated": 12 - int(result.unique.sum())}
    dup = ~result.unique
    assert summary["final_token_ce"]["duplicated"]["hmm"] == pytest.approx(result.final_ce["hmm"][dup].mean())

    # per position: the mean over the sequences that reach it of -log p(x_t | x_<t), by brute force
    for t in range(5):
        reach = [x for x in test if len(x) > t]
        expected = np.mean([-math.log(brute_next_token_probs(hmm, x[:t])[x[t]]) for x in reach])
        row = result.position_ce.iloc[t]
        assert row.sequences == len(reach) and row.hmm == pytest.approx(expected, rel=1e-10)


def test_an_empty_subset_is_reported_as_null_not_nan():
    hmm = HMM.random(2, 3, seed=1)
    test = [np.array([1, 0]), np.array([2, 1, 0])]  # no duplicates
    summary = evaluate(hmm, Baselines.fit(test, 3, 1e-6), test, batch_size=4).summary()
    assert summary["sequences"]["duplicated"] == 0
    assert summary["final_token_ce"]["duplicated"] == {"hmm": None, "uniform": None, "unigram": None, "bigram": None}
    json.dumps(summary, allow_nan=False)  # valid JSON for DVC


# ---- the stages on a tiny generated corpus -------------------------------------------------------------------


def _hmm_project(directory: Path, repo_params: dict, **hmm) -> None:
    params = {**repo_params, "text": {**repo_params["text"], "stories": 80, "vocab_sizes": [60, 100]},
              "hmm": {**repo_params["hmm"], "vocab_size": 100, "hidden_states": 4, "epochs": 3, "batch_size": 32,
                      "update_freq": 2, "device": "cpu", "checkpoint_every": 1, "keep_checkpoints": 0, **hmm}}
    write_params(directory, params)


@pytest.fixture
def tokenized(project):
    directory, repo_params = project
    _hmm_project(directory, repo_params)
    params = load_params("params.yaml")
    run_corpus(params)
    run_tokenize(params)
    return directory, repo_params


def test_corpus_and_tokenize_stages_write_both_splits_with_the_train_vocabulary(tokenized):
    assert len(list(load_stories(str(corpus_file("train")), "train"))) == 80
    assert len(list(load_stories(str(corpus_file("test")), "test"))) == 16
    summary = json.loads(TOKEN_STATS.read_text())
    for k in (60, 100):
        train_vocab = json.loads((token_dir("train", k) / "vocab.json").read_text())
        assert json.loads((token_dir("test", k) / "vocab.json").read_text()) == train_vocab
        assert len(train_vocab) == k and train_vocab[0] == "."
        for split in ("train", "test"):
            lines = read_token_file(token_dir(split, k) / "tokens.txt", k)  # every id < K, every line ends in 0
            assert summary[split][f"K{k}"]["sentences_kept"] == len(lines) > 0
            assert summary[split][f"K{k}"]["tokens"] == sum(map(len, lines))
    # the test split kept exactly its sentences whose words are all among the train split's top K
    words_of = json.loads((token_dir("train", 100) / "vocab.json").read_text())
    test_lines = read_token_file(token_dir("test", 100) / "tokens.txt", 100)
    assert " ".join(words_of[i] for i in test_lines[0]).endswith(".")


def test_corpus_from_a_local_dataset_dict(project):
    directory, repo_params = project
    splits = {"train": ["Tom ran. Sue sat.", "A dog ran."], "validation": ["Sue ran."]}
    datasets.DatasetDict({name: datasets.Dataset.from_dict({"story": texts}) for name, texts in splits.items()}) \
        .save_to_disk(directory / "tiny")
    write_params(directory, {**repo_params, "text": {**repo_params["text"], "source": str(directory / "tiny"),
                                                     "text_field": "story"}})
    run_corpus(load_params("params.yaml"))
    assert list(load_stories(str(corpus_file("train")), "train")) == splits["train"]
    assert list(load_stories(str(corpus_file("test")), "test")) == splits["validation"]


def test_sequences_are_sentences_or_rows_of_the_token_stream(tokenized):
    params = load_params("params.yaml")
    sentences = read_sequences("train", params.hmm)
    assert [list(s) for s in sentences] == [list(s) for s in read_token_file(token_dir("train", 100) / "tokens.txt",
                                                                              100)]
    rows = read_sequences("train", load_params("params.yaml", ["hmm.seq_length=7"]).hmm)
    stream = np.concatenate(sentences)
    assert len(rows) == len(stream) // 7
    np.testing.assert_array_equal(np.stack(rows).reshape(-1), stream[: len(rows) * 7])


def _pomegranate_heldout_ll_per_token(hmm: HMM, sequences) -> float:
    """An independent log-likelihood: pomegranate's DenseHMM.log_probability, one length at a time."""
    from labpipe.hmm import to_dense_hmm

    model = to_dense_hmm(hmm)
    total = 0.0
    by_length = collections.defaultdict(list)
    for x in sequences:
        by_length[len(x)].append(x)
    for length, group in by_length.items():
        if length == 1:  # DenseHMM cannot score one-symbol sequences; by hand: sum_z start E end
            total += sum(math.log(float((hmm.start * hmm.emission[:, x[0]] * hmm.end).sum())) for x in group)
        else:
            total += float(model.log_probability(torch.tensor(np.stack(group))[:, :, None]).sum())
    return total / sum(map(len, sequences))


def test_hmm_train_logs_every_epoch_keeps_the_best_and_registers_a_champion(tokenized):
    params = load_params("params.yaml")
    run_train(params)
    metrics = json.loads((OUT_DIR / "metrics.json").read_text())
    history = pd.read_csv(OUT_DIR / "history.csv")
    assert list(history.epoch) == [1, 2, 3]
    assert metrics["best_heldout_ll_per_token"] == pytest.approx(history.heldout_ll_per_token.max())
    saved = torch.load(OUT_DIR / "model.pt", weights_only=False)
    assert saved["epoch"] == metrics["best_epoch"] and len(saved["vocab"]) == 100
    best = HMM.from_state_dict(saved["hmm"])
    independent = _pomegranate_heldout_ll_per_token(best, read_sequences("test", params.hmm))
    assert metrics["best_heldout_ll_per_token"] == pytest.approx(independent, rel=1e-9)

    client = MlflowClient()
    champion = client.get_model_version_by_alias("hmm-K100", "champion")
    run = client.get_run(champion.run_id)
    assert run.data.tags["labpipe.stage"] == "hmm_train"
    assert {m.step for m in client.get_metric_history(run.info.run_id, "heldout_ll_per_token")} == {1, 2, 3}
    for name in ("train_ll_per_token", "epoch_seconds", "tokens_per_s", "peak_memory_mb"):
        assert name in run.data.metrics
    assert float(champion.tags["metric.heldout_ll_per_token"]) == pytest.approx(metrics["best_heldout_ll_per_token"])


def test_both_backends_give_the_same_training_history(tokenized):
    histories = {}
    for backend in ("torch", "pomegranate"):
        for stale in (OUT_DIR, Path("mlruns")):
            if stale.exists():
                shutil.rmtree(stale)
        run_train(load_params("params.yaml", [f"hmm.backend={backend}"]))
        histories[backend] = pd.read_csv(OUT_DIR / "history.csv")
    for column in ("train_ll_per_token", "heldout_ll_per_token"):
        np.testing.assert_allclose(histories["torch"][column], histories["pomegranate"][column], rtol=1e-6)


def test_a_run_over_the_memory_budget_refuses_to_start_with_its_estimate(tokenized):
    budget = ["hmm.memory_budget_gb=0.00006", "hmm.backend=pomegranate"]  # 60 kB
    with pytest.raises(ValueError, match=r"would need about 0.000\d+ GB for one E-step .*\(about \d+ fits\)"):
        run_train(load_params("params.yaml", budget))
    assert not OUT_DIR.exists()
    experiment = MlflowClient().get_experiment_by_name(LINE)  # made by the tokenize stage
    assert MlflowClient().search_runs([experiment.experiment_id], "tags.`labpipe.stage` = 'hmm_train'") == []


def test_a_vocab_size_that_was_not_tokenized_is_a_clear_error(tokenized):
    with pytest.raises(ValueError, match=r"hmm.vocab_size=200 must be one of text.vocab_sizes"):
        run_train(load_params("params.yaml", ["hmm.vocab_size=200"]))


def _labpipe(directory: Path, script: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script], cwd=directory, capture_output=True, text=True, timeout=300)


def test_nan_during_em_stops_naming_epoch_and_batch_and_writes_nothing(tokenized):
    # eps = 0 is the seed's bug: a symbol absent from the first minibatches gets probability 0 at the first
    # M-step, and the next batch that holds it has likelihood 0.
    directory, _ = tokenized
    done = subprocess.run([sys.executable, "-m", "labpipe", "hmm-train", "--set", "hmm.eps=0", "--set",
                           "hmm.batch_size=4", "--set", "hmm.update_freq=1"], cwd=directory, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 1
    assert "EM diverged in epoch 1, batch" in done.stderr
    assert not (OUT_DIR / "model.pt").exists() and checkpoint.list_checkpoints(CHECKPOINTS) == []


NAN_IN_EPOCH_3 = """
import sys
import labpipe.hmm.train as train
real = train.em_epoch

def em_epoch(backend, batches, update_freq, eps, epoch):
    if epoch == 3:  # statistics go NaN, as they did in the seed
        backend._hmm.emission[:, 5] = float("nan")
    return real(backend, batches, update_freq, eps, epoch)

train.em_epoch = em_epoch
from labpipe.cli import main
sys.exit(main(["hmm-train"]))
"""


def test_nan_in_a_later_epoch_keeps_the_last_good_checkpoints(tokenized):
    directory, repo_params = tokenized
    _hmm_project(directory, repo_params, epochs=4)
    done = _labpipe(directory, NAN_IN_EPOCH_3)
    assert done.returncode == 1 and "EM diverged in epoch 3, batch " in done.stderr, done.stderr
    kept = checkpoint.list_checkpoints(CHECKPOINTS)
    assert [p.name for p in kept] == ["epoch_00000001.pt", "epoch_00000002.pt"]
    HMM.from_state_dict(checkpoint.load(kept[-1])["hmm"]).validate()  # finite, normalized: good to resume from
    assert not (OUT_DIR / "model.pt").exists()


KILL_IN_EPOCH_3 = """
import os, signal, sys
import labpipe.hmm.train as train
real = train.em_epoch

def em_epoch(backend, batches, update_freq, eps, epoch):
    if epoch == 3:  # SIGKILL after the first minibatch of epoch 3: mid-epoch, checkpoints 1 and 2 written
        backend.summarize(next(iter(batches)))
        os.kill(os.getpid(), signal.SIGKILL)
    return real(backend, batches, update_freq, eps, epoch)

train.em_epoch = em_epoch
from labpipe.cli import main
sys.exit(main(["hmm-train"]))
"""


def test_a_killed_training_resumes_to_the_same_model(tokenized, tmp_path):
    directory, repo_params = tokenized
    _hmm_project(directory, repo_params, epochs=4)
    uninterrupted = _labpipe(directory, "import sys; from labpipe.cli import main; sys.exit(main(['hmm-train']))")
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    reference = checkpoint.load(CHECKPOINTS / "epoch_00000004.pt")
    reference_history = pd.read_csv(OUT_DIR / "history.csv")
    shutil.rmtree(OUT_DIR)

    killed = _labpipe(directory, KILL_IN_EPOCH_3)
    assert killed.returncode == -9
    assert [p.name for p in checkpoint.list_checkpoints(CHECKPOINTS)] == ["epoch_00000001.pt", "epoch_00000002.pt"]
    run_id = checkpoint.load(CHECKPOINTS / "epoch_00000002.pt")["state"]["run_id"]
    resumed = _labpipe(directory, "import sys; from labpipe.cli import main; sys.exit(main(['hmm-train']))")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from artifacts/hmm/checkpoints/epoch_00000002.pt" in resumed.stdout
    final = checkpoint.load(CHECKPOINTS / "epoch_00000004.pt")
    for name, tensor in reference["hmm"].items():
        assert torch.equal(tensor, final["hmm"][name]), name
    resumed_history = pd.read_csv(OUT_DIR / "history.csv")
    pd.testing.assert_frame_equal(reference_history[["epoch", "train_ll_per_token", "heldout_ll_per_token"]],
                                  resumed_history[["epoch", "train_ll_per_token", "heldout_ll_per_token"]])
    assert final["state"]["run_id"] == run_id
    steps = {m.step for m in MlflowClient().get_metric_history(run_id, "heldout_ll_per_token")}
    assert steps == {1, 2, 3, 4} and MlflowClient().get_run(run_id).info.status == "FINISHED"


def test_evaluation_reports_baselines_and_evaluating_twice_changes_nothing(tokenized):
    params = load_params("params.yaml")
    run_train(params)
    model_hash = sha256_file(OUT_DIR / "model.pt")
    run_eval(params)
    first = (OUT_DIR / "eval/metrics.json").read_text()
    first_table = (OUT_DIR / "eval/per_position_ce.csv").read_text()
    run_eval(params)
    assert (OUT_DIR / "eval/metrics.json").read_text() == first
    assert (OUT_DIR / "eval/per_position_ce.csv").read_text() == first_table
    assert sha256_file(OUT_DIR / "model.pt") == model_hash

    summary = json.loads(first)
    test = read_sequences("test", params.hmm)
    assert summary["sequences"]["overall"] == len(test)
    assert summary["final_token_ce"]["overall"]["uniform"] == pytest.approx(math.log(100))
    # the unigram baseline from a count of the train file, by hand
    counts = collections.Counter(int(i) for x in read_sequences("train", params.hmm) for i in x)
    total = sum(counts.values())
    unigram_ce = np.mean([-math.log(1e-14 + (1 - 100e-14) * counts[int(x[-1])] / total) for x in test])
    assert summary["final_token_ce"]["overall"]["unigram"] == pytest.approx(unigram_ce, rel=1e-9)
    table = pd.read_csv(OUT_DIR / "eval/per_position_ce.csv")
    assert list(table.columns) == ["position", "sequences", "hmm", "uniform", "unigram", "bigram"]
    assert table.sequences.iloc[0] == len(test) and (table.sequences.diff().dropna() <= 0).all()
    assert (OUT_DIR / "eval/per_position_ce.png").stat().st_size > 0
    experiment = MlflowClient().get_experiment_by_name(LINE)
    runs = MlflowClient().search_runs([experiment.experiment_id], "tags.`labpipe.stage` = 'hmm_eval'")
    assert len(runs) == 2
    assert runs[0].data.metrics["final_ce/overall/hmm"] == pytest.approx(summary["final_token_ce"]["overall"]["hmm"])

