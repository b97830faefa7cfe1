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
    detokenize,
    distinct,
    generate_stories,
    iter_token_file,
    load_stories,
    read_token_file,
    sentences,
    split_singletons,
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
        "singleton_sentences": 0, "duplicated_sentences": 2, "distinct_sentences": 1,
        "length_histogram": {"4": 2}, "max_length": 4,
    }  # fmt: skip
    assert stats[10] == {
        "sentences_total": 5, "sentences_kept": 5, "kept_fraction": 1.0, "tokens": 21,
        "singleton_sentences": 3, "duplicated_sentences": 2, "distinct_sentences": 4,
        "length_histogram": {"4": 4, "5": 1}, "max_length": 5,
    }  # fmt: skip
    for k in (4, 10):
        assert json.loads((tmp_path / f"K{k}" / "stats.json").read_text()) == stats[k]
        tokens = read_token_file(tmp_path / f"K{k}" / "tokens.txt", vocab_size=k)  # validates: ids < K, ends with 0
        singletons, duplicated = split_singletons(tokens)
        assert (len(singletons), len(duplicated)) == (stats[k]["singleton_sentences"], stats[k]["duplicated_sentences"])
        assert len(distinct(tokens)) == stats[k]["distinct_sentences"]


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
    assert stats[100]["singleton_sentences"] > 0 and stats[100]["duplicated_sentences"] > 0
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


def test_split_singletons_partitions_by_exact_repeats_in_file_order():
    sentences_in = [np.array([1, 0]), np.array([2, 0]), np.array([1, 0]), np.array([1, 2, 0]), np.array([2, 1, 0])]
    singletons, duplicated = split_singletons(sentences_in)
    assert [ids.tolist() for ids in singletons] == [[2, 0], [1, 2, 0], [2, 1, 0]]
    assert [ids.tolist() for ids in duplicated] == [[1, 0], [1, 0]]


def test_distinct_keeps_each_sentence_once_at_its_first_occurrence():
    sentences_in = [np.array([1, 0]), np.array([2, 0]), np.array([1, 0]), np.array([1, 2, 0]), np.array([2, 0]),
                    np.array([1, 0], dtype=np.int64)]  # the same ids in another dtype are the same sentence
    assert [ids.tolist() for ids in distinct(sentences_in)] == [[1, 0], [2, 0], [1, 2, 0]]


def test_detokenize_writes_punctuation_against_words_and_capitalizes_sentences():
    assert detokenize(words('Once upon a time, there was a dog. "Let\'s go," she said.')) == \
        'Once upon a time, there was a dog. "Let\'s go," she said.'
    assert detokenize(["the", "cat", "sat", ".", "it", "ran", "!", "."]) == "The cat sat. It ran!."
    assert detokenize([]) == ""


# ----------------------------------------------------------------------------- the lab's own files


def export_as_the_lab(tokens_dir, ks, directory):
    """labpipe's token files in the seed's format: TinyStories-{K}-{split}.txt and tokenizer.json {word: id}."""
    directory.mkdir()
    for split in ("train", "test"):
        for k in ks:
            (directory / f"TinyStories-{k}-{split}.txt").write_bytes((tokens_dir / split / f"K{k}" / "tokens.txt")
                                                                     .read_bytes())
    vocab = json.loads((tokens_dir / "train" / f"K{max(ks)}" / "vocab.json").read_text())
    (directory / "tokenizer.json").write_text(json.dumps({word: i for i, word in enumerate(vocab)}))


def test_the_lab_files_import_round_trips_labpipes_own(tmp_path):
    from labpipe.text.lab_files import import_corpus, tokenize_imported

    ks = [60, 100]
    ours = tmp_path / "ours"
    train_stats = tokenize_corpus(lambda: generate_stories(80, seed=0), ks, ours / "train")
    vocab = json.loads((ours / "train" / "K100" / "vocab.json").read_text())
    tokenize_corpus(lambda: generate_stories(20, seed=1), ks, ours / "test", vocab=vocab)
    export_as_the_lab(ours, ks, tmp_path / "lab")

    corpus, imported = tmp_path / "corpus", tmp_path / "imported"
    corpus.mkdir()
    counts = import_corpus(f"token-files:{tmp_path / 'lab'}", ks, corpus)
    stats = tokenize_imported(corpus, ks, imported)
    for split in ("train", "test"):
        for k in ks:
            for name in ("tokens.txt", "vocab.json"):
                assert (imported / split / f"K{k}" / name).read_bytes() == (ours / split / f"K{k}" / name).read_bytes()
            lines = len(read_token_file(ours / split / f"K{k}" / "tokens.txt", k))
            assert counts[f"{split}_K{k}_sentences"] == lines == stats[split][k]["sentences_kept"]
    for k in ks:  # the same stats, but that the lab's corpus before its filtering is unknown
        expected = {**train_stats[k], "sentences_total": train_stats[k]["sentences_kept"], "kept_fraction": 1.0}
        assert stats["train"][k] == expected
        assert json.loads((imported / "train" / f"K{k}" / "stats.json").read_text()) == expected


def test_the_seeds_tokenizer_json_is_read_as_words_by_id(tmp_path):
    from labpipe.text.lab_files import read_tokenizer

    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps({"the": 1, ".": 0, "cat": 2}))
    assert read_tokenizer(path) == [".", "the", "cat"]
    path.write_text(json.dumps([".", "the"]))  # labpipe's vocab.json
    assert read_tokenizer(path) == [".", "the"]


@pytest.mark.parametrize("content, why", [
    ({"the": 1, ".": 0, "cat": 3}, "the ids must be 0..2, each once; 2 is missing"),
    ({"the": 0, ".": 1}, "id 0 must be '.' (every line of a token file ends with it), got 'the'"),
    ({".": 0, "the": "1"}, "every id must be an integer"),
    ([".", "the", "the"], "a word appears twice"),
    ("the", "expected a JSON object {word: id} or a list of words, got str"),
])
def test_a_bad_tokenizer_json_is_one_line_naming_it(tmp_path, content, why):
    from labpipe.text.lab_files import read_tokenizer

    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(content))
    with pytest.raises(InputError, match="^" + re.escape(f"{path}: {why}") + "$"):
        read_tokenizer(path)


def test_the_lab_files_get_the_checks_of_labpipes_own(tmp_path):
    from labpipe.text.lab_files import import_corpus

    lab, out = tmp_path / "lab", tmp_path / "out"
    lab.mkdir()
    out.mkdir()
    (lab / "tokenizer.json").write_text(json.dumps({".": 0, "a": 1, "b": 2}))
    (lab / "TinyStories-3-train.txt").write_text("1 2 0\n2 0\n")
    (lab / "TinyStories-3-test.txt").write_text("1 0\n1 2\n")
    source = f"token-files:{lab}"
    with pytest.raises(InputError, match=re.escape("TinyStories-3-test.txt, line 2: the line does not end with 0")):
        import_corpus(source, [3], out)
    with pytest.raises(InputError, match=re.escape(f"{lab / 'TinyStories-2-train.txt'}: no such file "
                                                   "(text.vocab_sizes has K=2)")):
        import_corpus(source, [2], out)
    with pytest.raises(InputError, match=re.escape(f"{lab / 'tokenizer.json'} has 3 words, fewer than "
                                                   "text.vocab_sizes' K=4")):
        import_corpus(source, [4], out)
    with pytest.raises(InputError, match=re.escape(f"text.source=token-files:{tmp_path / 'nope'}: ")):
        import_corpus(f"token-files:{tmp_path / 'nope'}", [3], out)
