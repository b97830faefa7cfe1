"""Word-level tokenization of stories into the lab's token files, one directory per vocabulary size K.

out_dir/K{K}/tokens.txt  kept sentences, one per line: space-separated ids, each line ending with 0 (".")
out_dir/K{K}/vocab.json  the K words, index = id: "." first, then by count (ties alphabetical)
out_dir/K{K}/stats.json  counts of the file, defined in `tokenize_corpus`

A sentence is kept for K only if all its words are among the K; ids do not depend on K (the
vocabulary for K is the first K words of one ranking), so the same sentence has the same line in every file.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from labpipe.errors import InputError
from labpipe.files import atomic_path, write_json
from labpipe.text.token_file import token_line

END = "."  # id 0: every sentence ends with it, whatever its terminator was
TYPOGRAPHIC = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"'})  # curly as straight
TOKEN = re.compile(
    r"""(?P<closed>[.!?]+")"""  # a terminator glued to a closing quote
    r"|(?P<end>[.!?]+)"  # "...", "?!": one sentence end
    r"|\w+(?:'\w+)*"  # words, apostrophes inside kept: didn't, lily's
    r"|[^\w\s]"  # any other symbol on its own: quotes, commas, ...
)


def words(text: str) -> list[str]:
    """Lowercase word and punctuation tokens; ".", "!", "?" (and runs like "?!") all become "."."""
    tokens = []
    for match in TOKEN.finditer(text.lower().translate(TYPOGRAPHIC)):
        if match["closed"]:
            # '"Hi!" said Tom.' -> " hi " . said tom .: the quote closes inside the sentence it belongs to
            tokens += ['"', END]
        elif match["end"]:
            tokens.append(END)
        else:
            tokens.append(match[0])
    return tokens


ATTACHED_LEFT = {END, ",", ";", ":", "!", "?"}  # written against the word before them


def detokenize(tokens: Sequence[str]) -> str:
    """Words back to readable text: punctuation against its word, quotes alternately opening and closing, each
    sentence capitalized. Lossy like `words` itself: "!" and "?" came back as ".", names as lowercase."""
    text, quote_open, capital = "", False, True
    for token in tokens:
        if token == '"':
            attach = quote_open  # a closing quote goes against the word before it
            quote_open = not quote_open
        else:
            attach = token in ATTACHED_LEFT or (quote_open and text.endswith('"'))  # after an opening quote
        word = token.capitalize() if capital and token[:1].isalpha() else token
        capital = (capital and not token[:1].isalpha()) or token == END
        text += word if attach or not text else " " + word
    return text


def encode(text: str, vocab: Sequence[str], where: str) -> list[int]:
    """The ids of `text`'s words (tokenized like the corpus) in `vocab`, the words by id of `where`; InputError
    naming the first word outside it."""
    ids = {word: i for i, word in enumerate(vocab)}
    tokens = words(text)
    if unknown := [word for word in tokens if word not in ids]:
        raise InputError(f"--prompt: {unknown[0]!r} is not among the {len(vocab)} words of {where}")
    return [ids[word] for word in tokens]


def sentences(text: str) -> Iterator[list[str]]:
    """The word stream cut after each "."; words after the last "." (a truncated sentence) are dropped."""
    sentence = []
    for word in words(text):
        if word != END:
            sentence.append(word)
        elif sentence:  # a "." with nothing before it (text starting with "!") is no sentence
            yield sentence + [END]
            sentence = []


def build_vocab(word_counts: collections.Counter, k: int) -> list[str]:
    """"." then the k - 1 most frequent other words, ties broken alphabetically so the list is deterministic."""
    if k < 1:
        raise InputError(f"k must be at least 1, got {k}")
    ranked = sorted((word for word in word_counts if word != END), key=lambda word: (-word_counts[word], word))
    if len(ranked) + 1 < k:
        raise InputError(f"the corpus has only {len(ranked) + 1} distinct words (counting '.'), fewer than k={k}")
    return [END] + ranked[: k - 1]


@dataclass
class KeptSentences:
    """Running stats of one token file.

    Memory: one 64-bit hash per distinct kept sentence (plus one per distinct sentence seen twice) and
    one counter entry per sentence length; nothing else grows with the corpus.
    """

    sentences_total: int = 0
    sentences_kept: int = 0
    tokens: int = 0
    seen: set[int] = field(default_factory=set)
    seen_twice: set[int] = field(default_factory=set)
    lengths: collections.Counter = field(default_factory=collections.Counter)

    def add(self, line: str, length: int) -> None:
        self.sentences_kept += 1
        self.tokens += length
        self.lengths[length] += 1
        # blake2b rather than hash(): the same stats in every process (hash() of str is salted per run)
        digest = int.from_bytes(hashlib.blake2b(line.encode(), digest_size=8).digest(), "little")
        (self.seen_twice if digest in self.seen else self.seen).add(digest)

    def as_dict(self) -> dict:
        once = len(self.seen) - len(self.seen_twice)  # seen_twice is a subset of seen
        return {
            "sentences_total": self.sentences_total,
            "sentences_kept": self.sentences_kept,
            "kept_fraction": self.sentences_kept / self.sentences_total,
            "tokens": self.tokens,
            "singleton_sentences": once,
            "duplicated_sentences": self.sentences_kept - once,
            "distinct_sentences": len(self.seen),
            "length_histogram": {str(length): count for length, count in sorted(self.lengths.items())},
            "max_length": max(self.lengths, default=0),
        }


def tokenize_corpus(
    stories: Callable[[], Iterable[str]], ks: Sequence[int], out_dir: str | Path, vocab: Sequence[str] | None = None
) -> dict:
    """Write tokens.txt, vocab.json and stats.json for each K in `ks` under out_dir/K{K}; returns {K: stats}.

    `vocab`: a ranking made on another corpus (the train split's), so that a test split gets the same ids;
    by default the ranking of this corpus.

    Two streaming passes over `stories()` (count words, then write), so it must give the same stories every call.
    Stats (lengths count ids, the final 0 included):
      sentences_total       sentences in the corpus (the same for every K)
      sentences_kept        lines of tokens.txt: sentences whose words are all in the vocabulary
      kept_fraction         sentences_kept / sentences_total
      tokens                ids in tokens.txt
      singleton_sentences   kept lines that occur exactly once in the file
      duplicated_sentences  kept lines that occur more than once, counted with multiplicity
                            (singleton_sentences + duplicated_sentences = sentences_kept, as in `split_singletons`)
      distinct_sentences    distinct kept lines: the size of the deduplicated file, the seed's "unique" set
      length_histogram      {length: number of kept lines of that length}, keys as strings (JSON)
      max_length            the longest kept line (0 if none)
    Memory: the word counter and, per K, the hashes in `KeptSentences`. Every file is written atomically:
    an error (one raised by `stories()` too) leaves the previous files as they were, never a half-written one.
    """
    ks, out_dir = sorted(set(ks)), Path(out_dir)
    word_counts = collections.Counter()
    sentences_total = 0
    for story in tqdm(stories(), desc="count words", unit=" stories"):
        for sentence in sentences(story):
            word_counts.update(sentence)
            sentences_total += 1
    if sentences_total == 0:
        raise InputError("stories() yielded no sentences")
    if vocab is None:
        vocab = build_vocab(word_counts, ks[-1])
    elif len(vocab) < ks[-1]:
        raise InputError(f"the given vocabulary has {len(vocab)} words, fewer than K = {ks[-1]}")
    vocab = list(vocab[: ks[-1]])
    word_ids = {word: word_id for word_id, word in enumerate(vocab)}
    out_of_vocab = len(vocab)  # an id above every K: the sentence is kept nowhere

    kept = {k: KeptSentences(sentences_total=sentences_total) for k in ks}
    with contextlib.ExitStack() as stack:
        token_files = {}
        for k in ks:
            tmp = stack.enter_context(atomic_path(out_dir / f"K{k}" / "tokens.txt"))
            token_files[k] = stack.enter_context(open(tmp, "w"))  # closed before atomic_path renames it
        second_pass_total = 0
        for story in tqdm(stories(), desc="write tokens", unit=" stories"):
            for sentence in sentences(story):
                second_pass_total += 1
                ids = [word_ids.get(word, out_of_vocab) for word in sentence]
                line, highest = token_line(ids), max(ids)
                for k in ks:
                    if highest < k:
                        token_files[k].write(line + "\n")
                        kept[k].add(line, len(ids))
        if second_pass_total != sentences_total:
            raise InputError(
                f"stories() gave {sentences_total} sentences on the first pass and {second_pass_total} on the second: "
                "it must yield the same stories on every call (pass a function that reopens the source)"
            )
        for k in ks:  # inside the block: tokens.txt, replaced on exit, lands last, when its vocab and stats are there
            write_json(out_dir / f"K{k}" / "vocab.json", vocab[:k])
            write_json(out_dir / f"K{k}" / "stats.json", kept[k].as_dict())
    return {k: kept[k].as_dict() for k in ks}
