"""labpipe hmm-sample and lm-sample: samples that follow the model, words from the saved vocabulary."""

from __future__ import annotations

import collections
import json
import re

import numpy as np
import pytest
import torch

from labpipe.files import save_torch
from labpipe.hmm import HMM
from labpipe.hmm.sample import main as hmm_sample
from labpipe.hmm.sample import sample_sequences
from labpipe.lm.sample import main as lm_sample

N = 4000  # samples: a frequency p is within 5 standard errors sqrt(p (1 - p) / N) of its estimate


def within_5_se(count: int, p: float) -> bool:
    return abs(count / N - p) <= 5 * np.sqrt(p * (1 - p) / N) + 1e-12


def one_hot_hmm() -> HMM:
    """State i emits symbol i + 1, but state 2 emits 0 ("."): a sample's symbols are its states."""
    start = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    transition = torch.tensor([[0.1, 0.6, 0.2], [0.3, 0.1, 0.5], [0.2, 0.2, 0.1]], dtype=torch.float64)
    end = 1 - transition.sum(1)  # 0.1, 0.1, 0.5
    emission = torch.zeros(3, 4, dtype=torch.float64)
    emission[0, 1] = emission[1, 2] = emission[2, 0] = 1
    return HMM(start, transition, end, emission)


STATE_OF = {1: 0, 2: 1, 0: 2}  # symbol -> the state that emits it


def test_hmm_samples_follow_the_model():
    hmm = one_hot_hmm()
    start, transition, end = (t.numpy() for t in (hmm.start, hmm.transition, hmm.end))
    samples = sample_sequences(hmm, N, max_length=3, seed=0)
    assert len(samples) == N
    firsts = collections.Counter(STATE_OF[int(x[0])] for x, _ in samples)
    pairs = collections.Counter((STATE_OF[int(x[0])], STATE_OF[int(x[1])]) for x, _ in samples if len(x) > 1)
    lengths = collections.Counter(len(x) for x, _ in samples)
    for i in range(3):
        assert within_5_se(firsts[i], start[i]), (i, firsts[i])
        for j in range(3):
            assert within_5_se(pairs[i, j], start[i] * transition[i, j]), (i, j, pairs[i, j])
    assert within_5_se(lengths[1], float(start @ end))
    assert within_5_se(lengths[2], float(start @ transition @ end))
    # cut: not ended after 3 symbols = moved on 3 times; a cut sequence has exactly max_length symbols
    cut = sum(c for _, c in samples)
    assert within_5_se(cut, float(start @ transition @ transition @ transition @ np.ones(3)))
    assert all(len(x) == 3 for x, c in samples if c) and all(len(x) <= 3 for x, _ in samples)
    again = sample_sequences(hmm, N, max_length=3, seed=0)  # seeded
    assert all(np.array_equal(x, y) for (x, _), (y, _) in zip(samples, again, strict=True))


VOCAB = [".", "zebra", "quokka", "yak"]


def test_hmm_sample_shows_the_saved_words_states_and_next_words(tmp_path, capsys):
    hmm = one_hot_hmm()
    path = tmp_path / "model.pt"
    save_torch({"hmm": hmm.state_dict(), "vocab": VOCAB}, path)
    assert hmm_sample(["--model", str(path), "--sentences", "30", "--prompt", "Zebra", "--top", "2"]) == 0
    out = capsys.readouterr().out
    samples = out.split("## 30 samples (seed 0)\n")[1].split("\n\n")[0].splitlines()
    assert len(samples) == 30
    for line in samples:  # every word is one of the saved vocabulary's (detokenized: capitals, "." glued)
        assert set(re.findall(r"\w+", line.lower())) <= set(VOCAB[1:]), line
    assert "state 0 (start 0.500, end 0.100): zebra 1.000" in out
    assert "state 2 (start 0.200, end 0.500): . 1.000" in out
    # after "zebra" the HMM is in state 0, so the next symbol is the next state's: A[0] / (1 - end[0])
    assert out.strip().endswith("## next word after 'Zebra'\nquokka 0.667, . 0.222")


def test_hmm_sample_refuses_a_word_outside_the_vocabulary_in_one_line(tmp_path, capsys):
    path = tmp_path / "model.pt"
    save_torch({"hmm": one_hot_hmm().state_dict(), "vocab": VOCAB}, path)
    assert hmm_sample(["--model", str(path), "--sentences", "0", "--prompt", "zebra lion"]) == 2
    assert capsys.readouterr().err == \
        f"labpipe hmm-sample: error: --prompt: 'lion' is not among the 4 words of {path}\n"
    save_torch({"hmm": one_hot_hmm().state_dict()}, path)  # no vocabulary saved: say where to find one
    assert hmm_sample(["--model", str(path)]) == 2
    assert "give --vocab artifacts/text/tokens/train/K<K>/vocab.json" in capsys.readouterr().err
    (tmp_path / "vocab.json").write_text(json.dumps(VOCAB))
    assert hmm_sample(["--model", str(path), "--vocab", str(tmp_path / "vocab.json"), "--states", "1"]) == 0


# ---- lm-sample ---------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_lm(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # far from uniform, so that the frequencies say something
    model.save_pretrained(tmp_path / "lm")
    return model.eval(), tmp_path / "lm"


def test_lm_samples_follow_the_model(tiny_lm, tmp_path, capsys, monkeypatch):
    model, directory = tiny_lm
    monkeypatch.chdir(tmp_path)  # no synthetic-data manifest here: ids
    args = ["--model", str(directory), "--prompt-ids", "1,3", "--sequences", str(N), "--length", "3",
            "--device", "cpu"]
    assert lm_sample(args) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert "ids (no artifacts/synth/manifest.json and no --vocab)" in header
    tokens = np.array([[int(i) for i in row.split()] for row in rows])
    assert tokens.shape == (N, 3) and (tokens[:, :2] == [1, 3]).all()
    with torch.no_grad():
        expected = torch.softmax(model(input_ids=torch.tensor([[1, 3]])).logits[0, -1], -1).numpy()
    counts = np.bincount(tokens[:, 2], minlength=4)
    assert all(within_5_se(int(counts[i]), float(expected[i])) for i in range(4)), (counts / N, expected)
    assert expected.max() < 0.99  # not a degenerate check

    (tmp_path / "vocab.json").write_text(json.dumps(VOCAB))
    worded = [*args[:4], "--sequences", "2", "--length", "6", "--vocab", "vocab.json", "--device", "cpu", "--seed", "4"]
    assert lm_sample(worded) == 0
    first = capsys.readouterr().out
    header, *lines = first.splitlines()
    assert "words of vocab.json" in header and len(lines) == 2
    for line in lines:
        assert line.startswith("Zebra yak") and set(re.findall(r"\w+", line.lower())) <= set(VOCAB[1:])
    assert lm_sample(worded) == 0
    assert capsys.readouterr().out == first  # seeded


def test_lm_sample_bad_input_is_one_line(tiny_lm, tmp_path, capsys, monkeypatch):
    _, directory = tiny_lm
    monkeypatch.chdir(tmp_path)
    assert lm_sample(["--model", str(directory), "--prompt", "zebra", "--device", "cpu"]) == 2
    assert capsys.readouterr().err.startswith("labpipe lm-sample: error: --prompt needs a vocabulary (no ")  # fast
    assert lm_sample(["--model", str(directory), "--prompt-ids", "1,9", "--device", "cpu"]) == 2
    assert "the prompt's ids must lie in [0, 4)" in capsys.readouterr().err
    assert lm_sample(["--model", str(tmp_path / "nope"), "--device", "cpu"]) == 2
    assert "nope: not a save_pretrained directory (no config.json)" in capsys.readouterr().err


@pytest.mark.parametrize("permute", [False, True])
def test_lm_sample_shows_the_generating_hmms_words_unless_the_emissions_were_permuted(tiny_lm, tmp_path, capsys,
                                                                                      monkeypatch, permute):
    from labpipe.files import sha256_file
    from labpipe.synth.manifest import MANIFEST, write_manifest

    _, directory = tiny_lm
    monkeypatch.chdir(tmp_path)
    hmm_path = tmp_path / "hmm.pt"
    save_torch({"hmm": one_hot_hmm().state_dict(), "vocab": VOCAB}, hmm_path)
    header = {"dtype": "<u2", "vocab_size": 4, "seq_length": 8, "sequences_per_shard": 4, "start": "initial",
              "permute_emissions": permute, "block_sequences": 4,
              "hmm": {"path": str(hmm_path), "sha256": sha256_file(hmm_path), "hidden_states": 3},
              "out_dir": str(tmp_path / "shards")}
    write_manifest(MANIFEST, header, [])
    assert lm_sample(["--model", str(directory), "--sequences", "50", "--length", "1", "--device", "cpu"]) == 0
    header_line, *rows = capsys.readouterr().out.splitlines()
    if permute:
        assert "ids (artifacts/synth/manifest.json: the emissions are permuted per block" in header_line
    else:  # words, and first tokens from the HMM's law of first symbols: never "yak", which no state emits
        assert f"words of {hmm_path}" in header_line
        assert set(rows) <= {"Zebra", "Quokka", "."} and len(rows) == 50
