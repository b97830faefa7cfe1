import collections
import json
import re
from collections.abc import Iterator

import datasets
import numpy as np
import pytest

from labpipe.errors import InputError
from labpipe.text import (
    build_vocab,
    generate_stories,
    iter_token_file,
    load_stories,
    read_token_file,
    sentences,
    split_unique,
    tokenize_corpus,
    words,
    write_token_file,
)

# ----------------------------------------------------------------------------- tokenizer


def test_words_lowercase_keep_inner_apostrophes_and_make_every_terminator_a_period():
    text = 'Lily didn\'t see Tom\'s ball. "Where is it?" she asked, "Is it here?!" Wow...'
    assert words(text) == [
        "lily", "didn't", "see", "tom's", "ball", ".",
        '"', "where", "is", "it", '"', ".",  # the closing quote stays in its sentence, before the "."
        "she", "asked", ",", '"', "is", "it", "here", '"', ".",
        "wow", ".",
    ]  # fmt: skip
    assert words("\u201cHi!\u201d Lily\u2019s cat: big") == ['"', "hi", '"', ".", "lily's", "cat", ":", "big"]


def test_sentences_end_with_a_period_and_drop_the_unfinished_tail():
    text = '!Once upon a time, there was a cat. "Meow!" said the cat. It was happy'
    assert list(sentences(text)) == [
        ["once", "upon", "a", "time", ",", "there", "was", "a", "cat", "."],
        ['"', "meow", '"', "."],
        ["said", "the", "cat", "."],
    ]


def test_build_vocab_puts_the_period_first_then_count_then_alphabet():
    counts = collections.Counter({"the": 5, ".": 4, "bee": 3, "ant": 3, "cow": 1})
    assert build_vocab(counts, 4) == [".", "the", "ant", "bee"]
    assert build_vocab(counts, 3) == build_vocab(counts, 5)[:3]  # nested: a word's id is the same for every K
    too_few = "the corpus has only 5 distinct words (counting '.'), fewer than k=6"
    with pytest.raises(ValueError, match=re.escape(too_few)):
        build_vocab(counts, 6)


# Word counts: "." 5, the 4, cat 3, sat 3, then once each: a, away, bird, dog, flew, ran (ids 4..9)
HAND_CORPUS = ["The cat sat. The dog sat! A cat ran?", "The cat sat. The bird flew away."]


def test_tokenize_corpus_by_hand(tmp_path):
    stats = tokenize_corpus(lambda: HAND_CORPUS, ks=[10, 4], out_dir=tmp_path)

    assert json.loads((tmp_path / "K4" / "vocab.json").read_text()) == [".", "the", "cat", "sat"]
    assert (tmp_path / "K4" / "tokens.txt").read_text() == "1 2 3 0\n1 2 3 0\n"  # sentences with dog, a, bird: dropped
    assert (tmp_path / "K10" / "tokens.txt").read_text() == "1 2 3 0\n1 7 3 0\n4 2 9 0\n1 2 3 0\n1 6 8 5 0\n"
    assert stats[4] == {
        "sentences_total": 5, "sentences_kept": 2, "kept_fraction": 0.4, "tokens": 8,
        "unique_sentences": 0, "duplicated_sentences": 2, "distinct_sentences": 1,
        "length_histogram": {"4": 2}, "max_length": 4,
    }  # fmt: skip
    assert stats[10] == {
        "sentences_total": 5, "sentences_kept": 5, "kept_fraction": 1.0, "tokens": 21,
        "unique_sentences": 3, "duplicated_sentences": 2, "distinct_sentences": 4,
        "length_histogram": {"4": 4, "5": 1}, "max_length": 5,
    }  # fmt: skip
    for k in (4, 10):
        assert json.loads((tmp_path / f"K{k}" / "stats.json").read_text()) == stats[k]
        tokens = read_token_file(tmp_path / f"K{k}" / "tokens.txt", vocab_size=k)  # validates: ids < K, ends with 0
        unique_once, duplicated = split_unique(tokens)
        assert (len(unique_once), len(duplicated)) == (stats[k]["unique_sentences"], stats[k]["duplicated_sentences"])


def test_tokenize_corpus_is_deterministic_and_needs_the_same_stories_twice(tmp_path):
    for out in ("a", "b"):
        tokenize_corpus(lambda: generate_stories(50, seed=3), ks=[100, 200], out_dir=tmp_path / out)
    files = sorted(path.relative_to(tmp_path / "a") for path in (tmp_path / "a").rglob("*") if path.is_file())
    assert len(files) == 6
    assert all((tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes() for file in files)

    once = iter(HAND_CORPUS)  # a single iterator: empty on the second pass
    with pytest.raises(ValueError, match="gave 5 sentences on the first pass and 0 on the second"):
        tokenize_corpus(lambda: once, ks=[4], out_dir=tmp_path / "c")
    assert not [path for path in (tmp_path / "c").rglob("*") if path.is_file()]


def test_tokenize_corpus_failing_midway_leaves_the_old_files_and_no_partial_ones(tmp_path):
    old = tmp_path / "K4" / "tokens.txt"
    old.parent.mkdir()
    old.write_text("1 0\n")
    calls = 0

    def stories():
        nonlocal calls
        calls += 1
        yield HAND_CORPUS[0]
        if calls == 2:  # the writing pass
            raise RuntimeError("source went away")
        yield HAND_CORPUS[1]

    with pytest.raises(RuntimeError, match="source went away"):
        tokenize_corpus(stories, ks=[4, 10], out_dir=tmp_path)
    assert [path for path in tmp_path.rglob("*") if path.is_file()] == [old]
    assert old.read_text() == "1 0\n"


# ----------------------------------------------------------------------------- embedded corpus


def test_generate_stories_is_seeded():
    stories = list(generate_stories(20, seed=0))
    assert len(stories) == 20 and len(set(stories)) == 20
    assert stories == list(generate_stories(20, seed=0))
    assert list(generate_stories(5, seed=0)) == stories[:5]
    assert set(stories).isdisjoint(generate_stories(20, seed=1))


def test_generated_corpus_has_a_long_tail_that_top_k_filtering_cuts(tmp_path):
    stats = tokenize_corpus(lambda: generate_stories(300, seed=0), ks=[100, 500], out_dir=tmp_path)
    assert 0.2 < stats[100]["kept_fraction"] < 0.8
    assert stats[100]["kept_fraction"] < stats[500]["kept_fraction"]
    assert stats[100]["unique_sentences"] > 0 and stats[100]["duplicated_sentences"] > 0
    counts = collections.Counter(word for story in generate_stories(300, seed=0) for word in words(story))
    assert len(counts) > 400
    assert {'"', ",", "don't", "let's"} <= counts.keys()
    text = "".join(generate_stories(300, seed=0))
    assert all(mark in text for mark in "!?")


# ----------------------------------------------------------------------------- loaders


def test_load_stories_from_a_saved_dataset(tmp_path):
    datasets.Dataset.from_dict({"text": ["a", "b", "c"], "id": [1, 2, 3]}).save_to_disk(tmp_path / "one")
    assert list(load_stories(str(tmp_path / "one"), "train")) == ["a", "b", "c"]
    assert list(load_stories(str(tmp_path / "one"), "train", limit=2)) == ["a", "b"]
    with pytest.raises(ValueError, match=re.escape("has no field 'story'; columns: text, id")):
        list(load_stories(str(tmp_path / "one"), "train", text_field="story"))

    splits = {"train": ["t1", "t2"], "validation": ["v1"]}
    datasets.DatasetDict({name: datasets.Dataset.from_dict({"text": texts}) for name, texts in splits.items()}) \
        .save_to_disk(tmp_path / "dict")
    assert list(load_stories(str(tmp_path / "dict"), "validation")) == ["v1"]
    with pytest.raises(ValueError, match=r"split 'test' not found in .*; available splits: train, validation$"):
        load_stories(str(tmp_path / "dict"), "test")


def test_load_stories_from_json_files(tmp_path):
    rows = [{"story": "Tom ran.", "id": 1}, {"story": "Sue sat.", "id": 2}]
    (tmp_path / "stories.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "stories.json").write_text(json.dumps(rows))
    for name in ("stories.jsonl", "stories.json"):
        assert list(load_stories(str(tmp_path / name), "train", text_field="story")) == ["Tom ran.", "Sue sat."]
    with pytest.raises(ValueError, match=re.escape("has no field 'text'; columns: story, id")):
        list(load_stories(str(tmp_path / "stories.jsonl"), "train"))


def test_load_stories_from_tinystories_text(tmp_path):
    marked = tmp_path / "TinyStories-valid.txt"
    marked.write_text("Once upon a time.\n\nThe end.\n<|endoftext|>\nTom ran.\n<|endoftext|>\n")
    assert list(load_stories(str(marked), "validation")) == ["Once upon a time.\n\nThe end.", "Tom ran."]
    blank_lines = tmp_path / "plain.txt"
    blank_lines.write_text("\nA cat.\n\nB dog.\nC bird.\n\n\n")
    assert list(load_stories(str(blank_lines), "train")) == ["A cat.", "B dog.\nC bird."]


def test_load_stories_missing_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for missing in (str(tmp_path / "nope"), "data/stories.txt", "./stories", "a/b/c"):  # none of them a hub name
        with pytest.raises(InputError, match=re.escape("no such file or directory")):
            load_stories(missing, "train")


def test_load_stories_streams_a_hub_dataset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no local "roneneldan/TinyStories" to shadow the hub name
    calls = []

    def rows():
        yield {"text": "x"}
        yield {"text": "y"}
        raise AssertionError("read past the limit")

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return rows()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    stories = load_stories("roneneldan/TinyStories", "validation", cache_dir="/cache", limit=2)
    assert isinstance(stories, Iterator) and list(stories) == ["x", "y"]
    assert calls == [(("roneneldan/TinyStories",), {"split": "validation", "cache_dir": "/cache", "streaming": True})]


# ----------------------------------------------------------------------------- token files


def test_token_file_round_trip(tmp_path):
    path = tmp_path / "tokens.txt"
    sentences_in = [[1, 2, 0], [3, 0], np.array([4, 4, 0]), [1, 2, 0]]
    write_token_file(path, sentences_in)
    assert path.read_text() == "1 2 0\n3 0\n4 4 0\n1 2 0\n"
    sentences_out = read_token_file(path, vocab_size=5)
    assert all(ids.dtype == np.int32 for ids in sentences_out)
    assert [ids.tolist() for ids in sentences_out] == [list(map(int, ids)) for ids in sentences_in]
    assert isinstance(iter_token_file(path, vocab_size=5), Iterator)


@pytest.mark.parametrize(
    "content, why",
    [
        ("1 2 0\n3 7 0\n", "line 2: id 7 is out of range for vocab size 5"),
        ("1 0\n1 -1 0\n", "line 2: id -1 is out of range for vocab size 5"),
        ("1 x 0\n", "line 1: token 'x' is not an integer"),
        ("1 2 0\n1.5 0\n", "line 2: token '1.5' is not an integer"),
        ("1 0\n\n2 0\n", "line 2: empty line"),
        ("1 0\n2 0\n1 2\n", "line 3: the line does not end with 0 (the id of '.')"),
        ("", "no sentences"),
    ],
)
def test_read_token_file_errors_name_the_file_and_line(tmp_path, content, why):
    path = tmp_path / "tokens.txt"
    path.write_text(content)
    with pytest.raises(ValueError, match="^" + re.escape(f"{path}") + "(, |: )" + re.escape(why) + "$"):
        read_token_file(path, vocab_size=5)


def test_split_unique_partitions_by_exact_repeats_in_file_order():
    sentences_in = [np.array([1, 0]), np.array([2, 0]), np.array([1, 0]), np.array([1, 2, 0]), np.array([2, 1, 0])]
    unique_once, duplicated = split_unique(sentences_in)
    assert [ids.tolist() for ids in unique_once] == [[2, 0], [1, 2, 0], [2, 1, 0]]
    assert [ids.tolist() for ids in duplicated] == [[1, 0], [1, 0]]
