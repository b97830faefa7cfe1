"""Token files: one sentence per line, space-separated word ids, each line ending with 0 (".").

Reading validates every line, so a bad file fails here with its name and line number, not later in training.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from labpipe.errors import InputError
from labpipe.files import atomic_path

INTEGER = re.compile(r"-?[0-9]+")  # stricter than int(), which also takes "+3" and "1_000"


def token_line(ids: Sequence[int]) -> str:
    """One sentence as a line of the file, without the newline."""
    return " ".join(map(str, ids))


def write_token_file(path: str | Path, sentences: Iterable[Sequence[int]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        for ids in sentences:
            f.write(token_line(ids) + "\n")


def iter_token_file(path: str | Path, vocab_size: int) -> Iterator[np.ndarray]:
    """The sentences of a token file as int32 arrays, one line at a time; ValueError on the first bad line."""
    count = 0
    with open(path, encoding="utf-8") as f:
        try:
            for line_number, line in enumerate(f, start=1):
                yield _parse_line(line, vocab_size, where=f"{path}, line {line_number}")
                count += 1
        except UnicodeDecodeError:
            raise InputError(f"{path}, line {count + 1}: not a token file (not UTF-8 text)") from None
    if count == 0:
        raise InputError(f"{path}: no sentences")


def _parse_line(line: str, vocab_size: int, where: str) -> np.ndarray:
    tokens = line.split()
    if not tokens:
        raise InputError(f"{where}: empty line")
    ids = []
    for token in tokens:
        if not INTEGER.fullmatch(token):
            raise InputError(f"{where}: token {token!r} is not an integer")
        token_id = int(token)
        if not 0 <= token_id < vocab_size:
            raise InputError(f"{where}: id {token_id} is out of range for vocab size {vocab_size}")
        ids.append(token_id)
    if ids[-1] != 0:
        raise InputError(f"{where}: the line does not end with 0 (the id of '.')")
    return np.array(ids, dtype=np.int32)


def read_token_file(path: str | Path, vocab_size: int) -> list[np.ndarray]:
    return list(iter_token_file(path, vocab_size))


def split_singletons(sentences: Sequence[Sequence[int]]) -> tuple[list, list]:
    """(sentences whose exact id sequence occurs once, those occurring more than once, every copy), in file order."""
    keys = [tuple(map(int, ids)) for ids in sentences]
    counts = collections.Counter(keys)
    singletons, duplicated = [], []
    for ids, key in zip(sentences, keys, strict=True):
        (duplicated if counts[key] > 1 else singletons).append(ids)
    return singletons, duplicated


def distinct(sentences: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Each distinct sentence once, at its first occurrence: the deduplicated file, the seed's "unique" set."""
    seen: set[bytes] = set()
    kept = []
    for ids in sentences:
        key = np.asarray(ids, dtype=np.int64).tobytes()
        if key not in seen:
            seen.add(key)
            kept.append(ids)
    return kept
