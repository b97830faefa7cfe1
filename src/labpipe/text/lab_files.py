"""The lab's existing token files as a corpus source: text.source = token-files:DIR.

DIR holds what the seed's tokenizer wrote: tokenizer.json, a JSON object {word: id} (labpipe's vocab.json, a
list whose index is the id, is read too), and for each K of text.vocab_sizes TinyStories-{K}-train.txt and
TinyStories-{K}-test.txt: one sentence per line, space-separated ids below K, each line ending with 0 (".").

Stage corpus checks every line as labpipe's own token files are checked (token_file.py: integers, ids below K,
the final 0, UTF-8, no empty line) and the tokenizer (ids 0..N-1 each once, "." at 0, at least max K words),
then copies the files into artifacts/text/corpus, the data product DVC versions. Stage tokenize writes
labpipe's token files from the copies: tokens.txt line by line (normalized: single spaces), vocab.json the
first K words of the tokenizer, stats.json as for labpipe's own files, where sentences_total is the file's
lines (the lab filtered its corpus before: kept_fraction is 1).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from labpipe.errors import InputError
from labpipe.files import atomic_path, write_json
from labpipe.inputs import read_json
from labpipe.text.token_file import iter_token_file, token_line
from labpipe.text.tokenizer import END, KeptSentences

PREFIX = "token-files:"
TOKENIZER = "tokenizer.json"
SPLITS = ("train", "test")


def is_token_files(source: str) -> bool:
    return source.startswith(PREFIX)


def source_dir(source: str) -> Path:
    return Path(source.removeprefix(PREFIX)).expanduser()


def lab_token_file(directory: Path, k: int, split: str) -> Path:
    return directory / f"TinyStories-{k}-{split}.txt"


def read_tokenizer(path: Path) -> list[str]:
    """The words by id of a tokenizer.json ({word: id}, or a list of words); InputError naming the file."""
    data = read_json(path, "tokenizer (the seed's {word: id})")
    if isinstance(data, list):
        words = data
    elif isinstance(data, dict):
        ids = list(data.values())
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise InputError(f"{path}: every id must be an integer")
        if sorted(ids) != list(range(len(ids))):
            missing = sorted(set(range(len(ids))) - set(ids))
            raise InputError(f"{path}: the ids must be 0..{len(ids) - 1}, each once"
                             + (f"; {missing[0]} is missing" if missing else ""))
        words = sorted(data, key=data.get)
    else:
        raise InputError(f"{path}: expected a JSON object {{word: id}} or a list of words, got {type(data).__name__}")
    if not all(isinstance(word, str) and word for word in words):
        raise InputError(f"{path}: every word must be a non-empty string")
    if len(set(words)) != len(words):
        raise InputError(f"{path}: a word appears twice")
    if not words or words[0] != END:
        raise InputError(f"{path}: id 0 must be {END!r} (every line of a token file ends with it), "
                         f"got {words[0] if words else 'no words'!r}")
    return words


def import_corpus(source: str, ks: Sequence[int], out_dir: Path) -> dict[str, int]:
    """Check the lab's files for every K and copy them into out_dir; returns {"{split}_K{k}_sentences": lines}."""
    directory = source_dir(source)
    if not directory.is_dir():
        raise InputError(f"text.source={source}: {directory} is not a directory")
    vocab = read_tokenizer(directory / TOKENIZER)
    if len(vocab) < max(ks):
        raise InputError(f"{directory / TOKENIZER} has {len(vocab)} words, fewer than text.vocab_sizes' "
                         f"K={max(ks)}")
    shutil.copyfile(directory / TOKENIZER, out_dir / TOKENIZER)
    counts = {}
    for k in ks:
        for split in SPLITS:
            path = lab_token_file(directory, k, split)
            if not path.is_file():
                raise InputError(f"{path}: no such file (text.vocab_sizes has K={k})")
            counts[f"{split}_K{k}_sentences"] = sum(1 for _ in iter_token_file(path, k))
            shutil.copyfile(path, out_dir / path.name)
    return counts


def tokenize_imported(corpus_dir: Path, ks: Sequence[int], tokens_dir: Path) -> dict[str, dict[int, dict]]:
    """tokens.txt, vocab.json and stats.json per split and K from the copies in corpus_dir; {split: {K: stats}}."""
    vocab = read_tokenizer(corpus_dir / TOKENIZER)
    stats = {}
    for split in SPLITS:
        stats[split] = {}
        for k in ks:
            path = lab_token_file(corpus_dir, k, split)
            if not path.is_file():
                raise InputError(f"{path}: no such file: run stage corpus with text.vocab_sizes including K={k}")
            kept, out = KeptSentences(), tokens_dir / split / f"K{k}"
            # tokens.txt lands last, as in tokenize_corpus: when its vocab and stats are there
            with atomic_path(out / "tokens.txt") as tmp, open(tmp, "w") as f:
                for ids in iter_token_file(path, k):
                    line = token_line(ids.tolist())
                    f.write(line + "\n")
                    kept.add(line, len(ids))
                kept.sentences_total = kept.sentences_kept
                write_json(out / "vocab.json", vocab[:k])
                write_json(out / "stats.json", kept.as_dict())
            stats[split][k] = kept.as_dict()
    return stats
