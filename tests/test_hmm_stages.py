"""Stages corpus -> tokenize -> hmm_train -> hmm_eval, checked against independent computations."""

import collections
import copy
import json
import math
import os
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

from conftest import REPO, make_queued, run_labpipe, write_params
from labpipe import checkpoint, registry
from labpipe.checkpoint import Checkpoints
from labpipe.config import load_params
from labpipe.errors import InputError
from labpipe.files import sha256_file
from labpipe.hmm import HMM, TorchBackend, em_epoch, pad_batches
from labpipe.hmm.evaluate import Baselines, evaluate, run_eval, summarize
from labpipe.hmm.train import HISTORY_COLUMNS, OUT_DIR, read_sequences, run_train
from labpipe.text import load_stories, read_token_file
from labpipe.text.stages import TOKEN_STATS, corpus_file, run_corpus, run_tokenize, token_dir
from test_hmm_core import brute_next_token_probs, random_sequences

CHECKPOINTS = OUT_DIR / "checkpoints"
EXPERIMENT = registry.line_of("hmm_train").experiment  # in-context-language-learning

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
    np.testing.assert_array_equal(result.singleton, [counts[x.tobytes()] == 1 for x in test])
    deduplicated = list({x.tobytes(): x for x in reversed(test)}.values())  # each distinct sequence once
    summary = summarize(result, evaluate(hmm, baselines, deduplicated, batch_size=5))
    singletons = int(result.singleton.sum())
    assert summary["sequences"] == {"overall": 12, "unique": len(counts), "singletons": singletons,
                                    "duplicated": 12 - singletons}
    assert singletons == sum(c == 1 for c in counts.values()) < len(counts) < 12
    dup = ~result.singleton
    assert summary["final_token_ce"]["duplicated"]["hmm"] == pytest.approx(result.final_ce["hmm"][dup].mean())
    # unique: the mean over the distinct sequences, each once (test[0] counted once, not three times)
    first_copies = [i for i, x in enumerate(test) if all(not np.array_equal(x, y) for y in test[:i])]
    assert summary["final_token_ce"]["unique"]["hmm"] == pytest.approx(result.final_ce["hmm"][first_copies].mean())

    # per position: the mean over the sequences that reach it of -log p(x_t | x_<t), by brute force
    for t in range(5):
        reach = [x for x in test if len(x) > t]
        expected = np.mean([-math.log(brute_next_token_probs(hmm, x[:t])[x[t]]) for x in reach])
        row = result.position_ce.iloc[t]
        assert row.sequences == len(reach) and row.hmm == pytest.approx(expected, rel=1e-10)


def test_an_empty_subset_is_reported_as_null_not_nan():
    hmm = HMM.random(2, 3, seed=1)
    test = [np.array([1, 0]), np.array([2, 1, 0])]  # no duplicates
    result = evaluate(hmm, Baselines.fit(test, 3, 1e-6), test, batch_size=4)
    summary = summarize(result, result)
    assert summary["sequences"]["duplicated"] == 0
    assert summary["final_token_ce"]["duplicated"] == {"hmm": None, "uniform": None, "unigram": None, "bigram": None}
    json.dumps(summary, allow_nan=False)  # valid JSON for DVC


# ---- the stages on a tiny generated corpus -------------------------------------------------------------------


def make_hmm_project(directory: Path, repo_params: dict, **hmm_overrides) -> None:
    """A project in `directory` ready for `python -m labpipe hmm-train`: the token files of a tiny generated
    corpus (the corpus and tokenize stages, run here in `directory`, when they are not there yet) and a
    params.yaml with sizes that train in seconds: 8 epochs, a checkpoint each, all kept, on the CPU; then
    `hmm_overrides` on top of the hmm section. MLflow goes to $MLFLOW_TRACKING_URI; the cwd is left as it was."""
    params = copy.deepcopy(repo_params)
    params["text"].update({"source": "generate", "stories": 80, "vocab_sizes": [60, 100]})
    params["hmm"].update({"backend": "torch", "vocab_size": 100, "hidden_states": 4, "seq_length": 0, "epochs": 8,
                          "batch_size": 32, "update_freq": 2, "init_from": "", "device": "cpu",
                          "checkpoint_every": 1, "keep_checkpoints": 0, **hmm_overrides})
    write_params(directory, params)
    cwd = os.getcwd()
    os.chdir(directory)
    try:
        if not all((token_dir(split, k) / name).is_file() for split in ("train", "test") for k in (60, 100)
                   for name in ("tokens.txt", "vocab.json")):
            text_params = load_params("params.yaml")
            run_corpus(text_params)
            run_tokenize(text_params)
    finally:
        os.chdir(cwd)


@pytest.fixture
def tokenized(project):
    directory, repo_params = project
    make_hmm_project(directory, repo_params, epochs=3)
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


def _numpy_final_token_scores(hmm: HMM, sequences) -> dict[str, float]:
    """The per-epoch held-out means, by a plain numpy forward pass over each sequence's prefix: the final
    token's -log p(x_{L-1} | x_<L-1, a symbol follows), and the seed's test-loss formula, cross_entropy over
    the predicted probabilities taken as logits: log sum_e exp p_e - p_{x_{L-1}}."""
    start, transition, emission = (getattr(hmm, name).double().numpy() for name in ("start", "transition", "emission"))
    final_ce, seed_loss = [], []
    for x in sequences:
        state = start
        if len(x) > 1:
            alpha = start * emission[:, x[0]]
            for symbol in x[1:-1]:
                alpha = (alpha / alpha.sum()) @ transition * emission[:, symbol]
            state = alpha @ transition
        probs = (state / state.sum()) @ emission
        final_ce.append(-math.log(probs[x[-1]]))
        seed_loss.append(math.log(np.exp(probs).sum()) - probs[x[-1]])
    return {"final_ce": float(np.mean(final_ce)), "seed_loss": float(np.mean(seed_loss))}


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
    assert run.data.tags["labpipe.line"] == "in-context-language-learning" and "labpipe.fingerprint" in run.data.tags

    # one checkpoint per epoch: the HMM, and the run's state (step, MLflow run, history, best)
    kept = Checkpoints(CHECKPOINTS, "epoch").all()
    assert [p.name for p in kept] == ["epoch_00000001.pt", "epoch_00000002.pt", "epoch_00000003.pt"]
    last = checkpoint.load(kept[-1])
    assert set(last) == {"format", "fingerprint", "state", "parts"} and set(last["parts"]) == {"model"}
    assert last["state"]["step"] == 3 and last["state"]["run_id"] == run.info.run_id
    assert last["state"]["best"]["step"] == metrics["best_epoch"]
    for name, tensor in saved["hmm"].items():
        assert torch.equal(last["state"]["best"]["weights"][name], tensor), name
    assert list(history.columns) == HISTORY_COLUMNS  # the trajectory; the timings are in MLflow and the checkpoints
    pd.testing.assert_frame_equal(pd.DataFrame(last["state"]["history"])[HISTORY_COLUMNS], history,
                                  check_exact=False, rtol=1e-12)
    timings = pd.DataFrame(last["state"]["history"])
    assert metrics["mean_tokens_per_s"] == pytest.approx(timings.tokens_per_s.mean())
    assert (timings.epoch_seconds > 0).all()
    final = HMM.from_state_dict(last["parts"]["model"])  # the HMM after epoch 3 scores the last held-out value
    assert _pomegranate_heldout_ll_per_token(final, read_sequences("test", params.hmm)) == pytest.approx(
        metrics["final_heldout_ll_per_token"], rel=1e-9)

    # the seed's curves: the final token's cross-entropy on the full and the deduplicated test set
    test, test_unique = read_sequences("test", params.hmm), read_sequences("test", params.hmm, unique=True)
    assert len({x.tobytes() for x in test}) == len(test_unique) < len(test)  # the tiny corpus repeats sentences
    full, unique = _numpy_final_token_scores(final, test), _numpy_final_token_scores(final, test_unique)
    last_row = history.iloc[-1]
    assert last_row.test_final_ce == pytest.approx(full["final_ce"], rel=1e-9)
    assert last_row.test_unique_final_ce == pytest.approx(unique["final_ce"], rel=1e-9)
    assert last_row.seed_test_loss == pytest.approx(full["seed_loss"], rel=1e-9)
    assert last_row.seed_test_loss_unique == pytest.approx(unique["seed_loss"], rel=1e-9)
    assert metrics["final_test_final_ce"] == last_row.test_final_ce
    train_tokens = sum(map(len, read_sequences("train", params.hmm)))
    assert list(history.tokens_seen) == [train_tokens, 2 * train_tokens, 3 * train_tokens] == \
        [m.value for m in client.get_metric_history(run.info.run_id, "tokens_seen")]
    for name in ("checkpoint_seconds", "eval_seconds"):  # the seed's save time, and the evaluation's
        assert [m.step for m in client.get_metric_history(run.info.run_id, name)] == [1, 2, 3]
    assert (OUT_DIR / "plots" / "final_ce.png").stat().st_size > 0


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


def test_train_unique_reads_each_distinct_sentence_once_per_epoch(tokenized):
    params = load_params("params.yaml", ["hmm.train_unique=true", "hmm.epochs=2", "hmm.update_freq=0"])
    train = read_sequences("train", params.hmm)
    distinct = {x.tobytes(): x for x in train}
    assert len(distinct) < len(train)  # the tiny corpus repeats sentences: the two runs differ
    run_train(params)
    history = pd.read_csv(OUT_DIR / "history.csv")
    tokens = sum(map(len, distinct.values()))
    assert list(history.tokens_seen) == [tokens, 2 * tokens]
    run = MlflowClient().get_run(checkpoint.load(Checkpoints(CHECKPOINTS, "epoch").all()[-1])["state"]["run_id"])
    assert int(run.data.tags["train_sequences"]) == len(distinct)
    assert run.data.params["hmm.train_unique"] == "True" and run.data.params["hmm.update_freq"] == "0"


def test_hmm_eval_on_a_saved_model_writes_beside_the_stages_eval(tokenized):
    directory, _ = tokenized
    params = load_params("params.yaml")
    run_train(params)
    run_eval(params)
    stage = json.loads((OUT_DIR / "eval/metrics.json").read_text())
    done = run_labpipe(directory, ["hmm-eval", "--model", "models:/hmm-K100@champion"])
    assert done.returncode == 0, done.stderr
    champion = json.loads((OUT_DIR / "eval-models_hmm-K100@champion/metrics.json").read_text())
    assert champion == stage  # the champion is the run's model.pt
    first = Checkpoints(CHECKPOINTS, "epoch").all()[0]
    done = run_labpipe(directory, ["hmm-eval", "--model", str(first)])
    assert done.returncode == 0, done.stderr
    early = json.loads((OUT_DIR / f"eval-{str(first).replace('/', '_')}/metrics.json").read_text())
    hmm = HMM.from_state_dict(checkpoint.load(first)["parts"]["model"])
    for subset, sequences in (("overall", read_sequences("test", params.hmm)),
                              ("unique", read_sequences("test", params.hmm, unique=True))):
        assert early["final_token_ce"][subset]["hmm"] == pytest.approx(
            _numpy_final_token_scores(hmm, sequences)["final_ce"], rel=1e-9)
    assert json.loads((OUT_DIR / "eval/metrics.json").read_text()) == stage  # the stage's own eval untouched
    for model, message in (("nope.pt", "nope.pt: no such file"),
                           ("models:/hmm-K999@champion", "models:/hmm-K999@champion: cannot load the model"),
                           (str(OUT_DIR / "history.csv"), "history.csv")):
        done = run_labpipe(directory, ["hmm-eval", "--model", model])
        assert done.returncode == 2 and message in done.stderr and len(done.stderr.splitlines()) == 1, done.stderr


def test_make_sweep_hmm_grids_hs_by_ks_or_pairs_hs_with_batches():
    assert sorted(map(sorted, make_queued("sweep-hmm", "HS=16 32", "KS=100 200"))) == sorted(
        sorted([f"hmm.hidden_states={h}", f"hmm.vocab_size={k}"]) for h in (16, 32) for k in (100, 200))
    paired = make_queued("sweep-hmm", "HS=100 200 300", "BATCHES=1024 256 128", "KS=100")  # the seed's arrays
    assert sorted(map(sorted, paired)) == sorted(
        sorted([f"hmm.hidden_states={h}", f"hmm.batch_size={b}", "hmm.vocab_size=100"])
        for h, b in ((100, 1024), (200, 256), (300, 128)))
    unequal = subprocess.run(["make", "-n", "sweep-hmm", "HS=1 2", "BATCHES=3"], cwd=REPO, capture_output=True,
                             text=True)
    assert unequal.returncode != 0
    assert "sweep-hmm: HS has 2 values and BATCHES 1: paired lists must be equally long" in unequal.stderr


def test_a_run_over_the_memory_budget_refuses_to_start_with_its_estimate(tokenized):
    budget = ["hmm.memory_budget_gb=0.00006", "hmm.backend=pomegranate"]  # 60 kB
    with pytest.raises(ValueError, match=r"would need about 0.000\d+ GB for one E-step .*\(about \d+ fits\)"):
        run_train(load_params("params.yaml", budget))
    assert not OUT_DIR.exists()
    experiment = MlflowClient().get_experiment_by_name(EXPERIMENT)  # made by the tokenize stage
    assert MlflowClient().search_runs([experiment.experiment_id], "tags.`labpipe.stage` = 'hmm_train'") == []


def test_a_vocab_size_that_was_not_tokenized_is_a_clear_error(tokenized):
    with pytest.raises(ValueError, match=r"hmm.vocab_size=200 must be one of text.vocab_sizes"):
        run_train(load_params("params.yaml", ["hmm.vocab_size=200"]))


def _labpipe(directory: Path, script: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script], cwd=directory, capture_output=True, text=True, timeout=300)


def test_the_seeds_eps_0_is_refused_before_em_and_writes_nothing(tokenized):
    # eps = 0 is the seed's bug: a symbol absent from the first minibatches gets probability 0 at the first
    # M-step, and the next batch that holds it has likelihood 0 (EM diverges: the NaN test below).
    directory, _ = tokenized
    done = subprocess.run([sys.executable, "-m", "labpipe", "hmm-train", "--set", "hmm.eps=0", "--set",
                           "hmm.batch_size=4", "--set", "hmm.update_freq=1"], cwd=directory, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip() == "labpipe hmm-train: error: params.yaml: hmm.eps must be > 0, got 0.0"
    assert not (OUT_DIR / "model.pt").exists() and Checkpoints(CHECKPOINTS, "epoch").all() == []


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
    make_hmm_project(directory, repo_params, epochs=4)
    done = _labpipe(directory, NAN_IN_EPOCH_3)
    assert done.returncode == 1 and "EM diverged in epoch 3, batch " in done.stderr, done.stderr
    kept = Checkpoints(CHECKPOINTS, "epoch").all()
    assert [p.name for p in kept] == ["epoch_00000001.pt", "epoch_00000002.pt"]
    saved = checkpoint.load(kept[-1])
    assert saved["state"]["step"] == 2 and [r["epoch"] for r in saved["state"]["history"]] == [1, 2]
    HMM.from_state_dict(saved["parts"]["model"]).validate()  # finite, normalized: good to resume from
    assert not (OUT_DIR / "model.pt").exists()


def test_extending_a_finished_run_equals_a_straight_run_and_continues_its_mlflow_run(tmp_path, mlflow_store,
                                                                                    repo_params, monkeypatch, capsys):
    extended, straight = tmp_path / "extended", tmp_path / "straight"
    results = {}
    for directory, lengths in ((extended, (3, 5)), (straight, (5,))):
        directory.mkdir()
        make_hmm_project(directory, repo_params)
        monkeypatch.chdir(directory)
        run_ids = []
        for epochs in lengths:
            run_train(load_params("params.yaml", [f"hmm.epochs={epochs}"]))
            run_ids.append(checkpoint.load(Checkpoints(CHECKPOINTS, "epoch").all()[-1])["state"]["run_id"])
        results[directory] = (checkpoint.load(CHECKPOINTS / "epoch_00000005.pt"), (OUT_DIR / "history.csv").read_text(),
                              torch.load(OUT_DIR / "model.pt", weights_only=False), run_ids)
        if directory == extended:
            assert "resuming from artifacts/hmm/checkpoints/epoch_00000003.pt (epoch 3)" in capsys.readouterr().out
    (ext_final, ext_history, ext_model, ext_runs), (ref_final, ref_history, ref_model, _) = results.values()
    for name, tensor in ref_final["parts"]["model"].items():
        assert torch.equal(ext_final["parts"]["model"][name], tensor), name
    for name, tensor in ref_model["hmm"].items():
        assert torch.equal(ext_model["hmm"][name], tensor), name
    assert ext_model["epoch"] == ref_model["epoch"]
    assert ext_history == ref_history and len(ext_history.splitlines()) == 6  # the header and 5 epochs

    run_id = ext_runs[0]
    assert ext_runs == [run_id, run_id]  # the extension continued the MLflow run of the first 3 epochs
    client = MlflowClient()
    assert {m.step for m in client.get_metric_history(run_id, "heldout_ll_per_token")} == {1, 2, 3, 4, 5}
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["labpipe.changed.hmm.epochs"] == "3 -> 5"


def test_init_from_starts_em_from_that_hmm(tokenized, tmp_path):
    params = load_params("params.yaml")
    train = read_sequences("train", params.hmm)
    one_batch = ["hmm.epochs=1", f"hmm.batch_size={len(train)}", "hmm.update_freq=1"]  # one E-step, one M-step

    def check_started_from(given: HMM, source: str) -> None:
        run_params = load_params("params.yaml", [*one_batch, f"hmm.init_from={source}"])
        run_train(run_params)
        history = pd.read_csv(OUT_DIR / "history.csv")
        # the epoch's one E-step ran under the given HMM: its train log-likelihood, independently
        assert history.train_ll_per_token[0] == pytest.approx(_pomegranate_heldout_ll_per_token(given, train),
                                                              rel=1e-9)
        # and the HMM it wrote is exactly one EM epoch from the given one
        expected = TorchBackend(given)
        em_epoch(expected, pad_batches(train, len(train), shuffle_seed=run_params.hmm.seed + 1), 1,
                 run_params.hmm.eps, 1)
        written = torch.load(OUT_DIR / "model.pt", weights_only=False)["hmm"]
        for name, tensor in expected.hmm.state_dict().items():
            assert torch.equal(written[name], tensor), name
        run = MlflowClient().get_run(checkpoint.load(CHECKPOINTS / "epoch_00000001.pt")["state"]["run_id"])
        assert run.data.tags["labpipe.init_from"] == source

    given = HMM.random(4, 100, seed=123)
    path = tmp_path / "given.pt"
    torch.save({"hmm": given.state_dict(), "vocab": ["."] * 100}, path)  # the form of hmm_train's model.pt
    check_started_from(given, str(path))

    # the registered champion (an HMMModule: its buffers are the HMM's state dict), by its MLflow URI
    champion = HMM.from_state_dict(torch.load(OUT_DIR / "model.pt", weights_only=False)["hmm"])
    check_started_from(champion, "models:/hmm-K100@champion")

    # a checkpoint of hmm_train: its HMM (parts.model), not its best
    saved = tmp_path / "checkpoint.pt"
    shutil.copy(CHECKPOINTS / "epoch_00000001.pt", saved)
    check_started_from(HMM.from_state_dict(checkpoint.load(saved)["parts"]["model"]), str(saved))

    for other, shape in ((HMM.random(5, 100, seed=1), "5 states and 100 symbols"),
                         (HMM.random(4, 60, seed=1), "4 states and 60 symbols")):
        torch.save({"hmm": other.state_dict()}, path)
        with pytest.raises(InputError, match=rf"^hmm.init_from={path}: an HMM of {shape}, but ") as error:
            run_train(load_params("params.yaml", [*one_batch, f"hmm.init_from={path}"]))
        assert "\n" not in str(error.value)


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
    experiment = MlflowClient().get_experiment_by_name(EXPERIMENT)
    runs = MlflowClient().search_runs([experiment.experiment_id], "tags.`labpipe.stage` = 'hmm_eval'")
    assert len(runs) == 2
    assert runs[0].data.metrics["final_ce/overall/hmm"] == pytest.approx(summary["final_token_ce"]["overall"]["hmm"])

