"""Stages corpus and tokenize: stories to text files, text files to the lab's top-K token files.

corpus    artifacts/text/corpus/{train,test}.txt: the stories of each split, TinyStories' own .txt format
          (stories separated by <|endoftext|> lines), from labpipe's story grammar or a dataset (text.source);
          with text.source = token-files:DIR, the lab's checked token files and tokenizer.json (lab_files.py)
tokenize  artifacts/text/tokens/{train,test}/K{K}/{tokens.txt,vocab.json,stats.json}; the test split is
          tokenized with the train split's ranking, so an id means the same word in both (imported token
          files keep the lab's ids); a summary of every file's stats in artifacts/text/token_stats.json
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tqdm import tqdm

from labpipe.config import Params, TextParams, flatten
from labpipe.errors import InputError
from labpipe.files import atomic_path, staged_outputs, write_json
from labpipe.text.corpus import END_OF_TEXT, generate_stories, load_stories
from labpipe.text.lab_files import import_corpus, is_token_files, tokenize_imported
from labpipe.text.tokenizer import tokenize_corpus

CORPUS_DIR = Path("artifacts/text/corpus")
TOKENS_DIR = Path("artifacts/text/tokens")
TOKEN_STATS = Path("artifacts/text/token_stats.json")  # the stats of every token file, a DVC metric
SPLITS = ("train", "test")


def corpus_file(split: str) -> Path:
    return CORPUS_DIR / f"{split}.txt"


def token_dir(split: str, vocab_size: int) -> Path:
    return TOKENS_DIR / split / f"K{vocab_size}"


def run_corpus(params: Params) -> None:
    """Stage corpus: write each split's stories as text (the data product DVC versions)."""
    from labpipe.tracking import stage_run

    t = params.text
    folder = corpus_file(SPLITS[0]).parent
    with stage_run(params.tracking, "corpus", flatten(t, "text.")) as run:
        with staged_outputs(folder) as staging:  # both splits, or neither
            if is_token_files(t.source):
                counts = import_corpus(t.source, t.vocab_sizes, staging)
            else:
                counts = {f"{split}_stories": _write_split(t, split, dataset_split, staging / corpus_file(split).name)
                          for split, dataset_split in zip(SPLITS, (t.train_split, t.test_split), strict=True)}
        run.log_metrics(counts, step=0)
        run.log_outputs([folder])


def _write_split(t: TextParams, split: str, dataset_split: str, path: Path) -> int:
    if t.source == "generate":
        # Another seed for the test split: its stories are new draws from the same grammar.
        count = t.stories if split == "train" else max(1, t.stories // 5)
        stories = generate_stories(count, t.seed if split == "train" else t.seed + 1)
    else:
        stories = load_stories(t.source, dataset_split, t.cache_dir or None, t.text_field, t.limit or None)
    written = write_stories(path, tqdm(stories, desc=f"corpus {split}", unit=" stories"))
    if written == 0:
        raise InputError(f"{t.source}: no stories in split {dataset_split!r}")
    print(f"{corpus_file(split)}: {written} stories")
    return written


def write_stories(path: Path, stories: Iterable[str]) -> int:
    """TinyStories .txt: each story followed by a line `<|endoftext|>`; atomic. Returns the story count."""
    count = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for story in stories:
            f.write(story.strip() + f"\n{END_OF_TEXT}\n")
            count += 1
    return count


def run_tokenize(params: Params) -> None:
    """Stage tokenize: one token file per K for each split; the test split uses the train split's words."""
    from labpipe.tracking import stage_run

    ks = params.text.vocab_sizes

    def stories(split: str):
        return lambda: load_stories(str(corpus_file(split)), split)

    if is_token_files(params.text.source):
        stats = tokenize_imported(CORPUS_DIR, ks, TOKENS_DIR)
        train_stats, test_stats = stats["train"], stats["test"]
    else:
        train_stats = tokenize_corpus(stories("train"), ks, TOKENS_DIR / "train")
        train_vocab = json.loads((token_dir("train", max(ks)) / "vocab.json").read_text())
        test_stats = tokenize_corpus(stories("test"), ks, TOKENS_DIR / "test", vocab=train_vocab)
    summary = {split: {f"K{k}": {key: value for key, value in stats[k].items() if key != "length_histogram"}
                       for k in ks}
               for split, stats in (("train", train_stats), ("test", test_stats))}
    write_json(TOKEN_STATS, summary)
    with stage_run(params.tracking, "tokenize", {"text.vocab_sizes": list(ks), "text.source": params.text.source}) \
            as run:
        run.log_metrics({f"{split}_K{k}_{key}": summary[split][f"K{k}"][key] for split in SPLITS for k in ks
                         for key in ("sentences_kept", "kept_fraction", "tokens", "distinct_sentences")}, step=0)
        run.log_outputs([TOKENS_DIR, TOKEN_STATS])
    for k in ks:
        print(f"K={k}: train keeps {train_stats[k]['sentences_kept']} of {train_stats[k]['sentences_total']} "
              f"sentences ({train_stats[k]['kept_fraction']:.1%}), test {test_stats[k]['sentences_kept']}")
