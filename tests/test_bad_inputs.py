"""Bad input, tried as a careful user would: one line naming the key or file, a non-zero exit, nothing changed.

A tiny project is run once through every stage. Each case copies it, spoils one thing (a param, a data or
model file, a manifest, the tracking store, the disk), runs one verb and checks the whole promise: a
non-zero exit, no traceback, a last stderr line that names what was wrong, every file under artifacts/ and
data/ with the sha256 it had before, and no MLflow run left RUNNING.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import shutil
import socket
import sqlite3
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from conftest import REPO, run_labpipe, tiny_params
from labpipe.mheight.data import SCHEMA

ORDER = ["mheight-data", "mheight-subsample", "grok-train", "corpus", "tokenize", "hmm-train", "hmm-eval", "synth",
         "lm-train", "lm-eval", "dormancy", "activations", "crosscoder-train"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A project on which every stage has run once (what `make run` leaves, at a tiny size)."""
    directory = tmp_path_factory.mktemp("finished")
    params = tiny_params(yaml.safe_load((REPO / "params.yaml").read_text().replace(": off", ': "off"')))
    (directory / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (directory / "data").mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{directory / 'mlflow.db'}")
        for verb in ORDER:
            done = run_labpipe(directory, [verb])
            assert done.returncode == 0, f"{verb}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return directory


# ----------------------------------------------------------------------------- ways to spoil a project


def garbage(relative: str, size: int | None = None) -> Callable[[Path], None]:
    """Replace a file by random bytes (of its own size unless `size`): a checksum is the only way to notice."""

    def spoil(project: Path) -> None:
        path = project / relative
        n = path.stat().st_size if size is None else size
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8).tobytes())

    return spoil


def truncate(relative: str) -> Callable[[Path], None]:
    def spoil(project: Path) -> None:
        path = project / relative
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    return spoil


def write(relative: str, content: str | bytes) -> Callable[[Path], None]:
    def spoil(project: Path) -> None:
        path = project / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())

    return spoil


def edit_frame(relative: str, change: Callable[[pd.DataFrame], pd.DataFrame]) -> Callable[[Path], None]:
    """Change an m-height dataset, written back in the pipeline's schema (or without a column)."""

    def spoil(project: Path) -> None:
        path = project / relative
        frame = change(pd.read_parquet(path))
        schema = pa.schema([field for field in SCHEMA if field.name in frame.columns])
        pq.write_table(pa.Table.from_pandas(frame, schema=schema, preserve_index=False), path)

    return spoil


def nan_in_p(frame: pd.DataFrame) -> pd.DataFrame:
    first = np.array(frame.at[0, "P"], dtype=float)
    first[0] = np.nan
    frame.at[0, "P"] = first
    return frame


def edit_json(relative: str, change: Callable[[dict], None]) -> Callable[[Path], None]:
    def spoil(project: Path) -> None:
        path = project / relative
        record = json.loads(path.read_text())
        change(record)
        path.write_text(json.dumps(record))

    return spoil


def edit_params(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def spoil(project: Path) -> None:
        params = yaml.safe_load((project / "params.yaml").read_text())
        change(params)
        (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    return spoil


def pickled(relative: str, obj) -> Callable[[Path], None]:
    return write(relative, pickle.dumps(obj))


def lab_files(tokenizer: str | None = None, bad_file: str | None = None) -> Callable[[Path], None]:
    """The lab's token files (text.source=token-files:lab) made from the project's own, then one spoilt: the
    tokenizer.json's text, or a line of `bad_file` without its final 0."""

    def spoil(project: Path) -> None:
        lab = project / "lab"
        lab.mkdir()
        for k in (60, 100):
            for split in ("train", "test"):
                tokens = (project / f"artifacts/text/tokens/{split}/K{k}/tokens.txt").read_text()
                (lab / f"TinyStories-{k}-{split}.txt").write_text(tokens)
        vocab = json.loads((project / "artifacts/text/tokens/train/K100/vocab.json").read_text())
        (lab / "tokenizer.json").write_text(tokenizer or json.dumps({word: i for i, word in enumerate(vocab)}))
        if bad_file:
            with open(lab / bad_file, "a") as f:
                f.write("1 2 3\n")

    return spoil


def first_shard(project: Path, split: str = "train") -> str:
    manifest = json.loads((project / "artifacts/synth/manifest.json").read_text())
    return next(f"{manifest['out_dir']}/{s['file']}" for s in manifest["shards"] if s["split"] == split)


# ----------------------------------------------------------------------------- the cases


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]  # verb and flags
    names: str  # what the last line of stderr must contain
    spoil: Callable[[Path], None] | None = None
    env: tuple[tuple[str, str], ...] = ()


def case(id: str, verb: str, names: str, *sets: str, spoil=None, flags=(), env=()) -> Case:
    return Case(id, (verb, *flags, *(f"--set={s}" for s in sets)), names, spoil, tuple(env))


STEP_2 = "artifacts/lm/checkpoints/step_00000002"
HMM_MODEL = "artifacts/hmm/model.pt"
TOKENS = "artifacts/text/tokens/train/K60/tokens.txt"
BUFFER = "artifacts/crosscoder/buffer"

CASES = [
    # params: ranges, types, cross-field rules, files, through the stage that reads them
    case("batch size 0", "grok-train", "grok.batch_size", "grok.batch_size=0"),
    case("negative epochs", "grok-train", "grok.epochs", "grok.epochs=-1"),
    case("zero hidden states", "hmm-train", "hmm.hidden_states", "hmm.hidden_states=0"),
    case("eps 0.5", "hmm-train", "hmm.eps", "hmm.eps=0.5"),
    case("eps too large for K", "hmm-train", "hmm.eps", "hmm.eps=0.01", "hmm.vocab_size=100"),
    case("lr nan", "lm-train", "lm.lr", "lm.lr=.nan"),
    case("lr inf", "lm-train", "lm.lr", "lm.lr=.inf"),
    case("l1 nan", "crosscoder-train", "crosscoder.l1_coef", "crosscoder.l1_coef=.nan"),
    case("seq length 0", "synth", "synth.seq_length", "synth.seq_length=0"),
    case("no samples", "mheight-data", "mheight.samples_per_group", "mheight.samples_per_group=0"),
    case("dormancy samples 0", "dormancy", "dormancy.samples", "dormancy.samples=0"),
    case("zero stories", "corpus", "text.stories", "text.stories=0"),
    case("heads do not divide", "lm-train", "lm.heads", "lm.heads=3"),
    case("l0 band inverted", "crosscoder-train", "crosscoder.champion_l0_min", "crosscoder.champion_l0_min=9",
         "crosscoder.champion_l0_max=1"),
    case("top_k above experts", "grok-train", "grok.top_k", "grok.model=moe", "grok.top_k=9"),
    case("unknown output head", "grok-train", "grok.output_head", "grok.output_head=h"),
    case("grokking drop of 1", "grok-train", "grok.grokking_drop", "grok.grokking_drop=1"),
    case("experts from 2 models for 4", "grok-train", "grok.init_experts_from", "grok.model=moe", "grok.experts=4",
         'grok.init_experts_from=["a.pt","b.pt"]'),
    case("too few test rows", "mheight-subsample", "mheight.test_per_group", "mheight.test_per_group=99999"),
    case("warmup past decay", "lm-train", "lm.warmup_steps", "lm.warmup_steps=1000"),
    case("unknown key", "grok-train", "grok.no_such_key", "grok.no_such_key=1"),
    case("string for a number", "grok-train", "grok.lr", "grok.lr=fast"),
    case("k not below n", "mheight-data", "mheight.k", "mheight.k=[9]"),
    case("vocab not tokenized", "hmm-train", "hmm.vocab_size", "hmm.vocab_size=77"),
    case("context below seq length", "lm-train", "lm.context_length", "lm.context_length=8"),
    case("unknown device", "grok-train", "grok.device", "grok.device=tpu"),
    case("cuda without a gpu", "grok-train", "grok.device", "grok.device=cuda"),
    case("layer past the model", "activations", "layer", "crosscoder.layer_a=7"),
    case("invalid yaml", "grok-train", "params.yaml", spoil=write("params.yaml", "grok: [unclosed\n")),
    case("unknown key in file", "grok-train", "grok.learning_rate",
         spoil=edit_params(lambda p: p["grok"].update(learning_rate=1))),
    case("missing key in file", "hmm-train", "hmm.eps", spoil=edit_params(lambda p: p["hmm"].pop("eps"))),
    case("params file missing", "grok-train", "nope.yaml", flags=("--params", "nope.yaml")),
    case("params file a folder", "grok-train", "artifacts", flags=("--params", "artifacts")),
    case("params not utf-8", "grok-train", "params.yaml", spoil=write("params.yaml", b"grok:\n  lr: \xff\xfe\n")),
    # data files
    case("nan in dataset P", "mheight-subsample", "dataset.parquet",
         spoil=edit_frame("artifacts/mheight/dataset.parquet", nan_in_p)),
    case("dataset random bytes", "mheight-subsample", "dataset.parquet",
         spoil=garbage("artifacts/mheight/dataset.parquet")),
    case("dataset lacks a column", "mheight-subsample", "dataset.parquet",
         spoil=edit_frame("artifacts/mheight/dataset.parquet", lambda f: f.drop(columns=["m"]))),
    case("nan height in train", "grok-train", "train.parquet", spoil=edit_frame(
        "artifacts/mheight/train.parquet", lambda f: f.assign(height=f["height"].where(f.index > 0, np.nan)))),
    case("inf in train P", "grok-train", "train.parquet", spoil=edit_frame(
        "artifacts/mheight/train.parquet", lambda f: nan_in_p(f).assign(P=f["P"].map(lambda p: np.nan_to_num(
            np.asarray(p, float), nan=np.inf))))),
    case("val truncated", "grok-train", "val.parquet", spoil=truncate("artifacts/mheight/val.parquet")),
    case("pickle garbage", "mheight-data", "bad.pkl", "mheight.source=pickles",
         spoil=garbage("data/mheight/bad.pkl", 300)),
    case("pickle not a frame", "mheight-data", "list.pkl", "mheight.source=pickles",
         spoil=pickled("data/mheight/list.pkl", [1, 2, 3])),
    case("pickle with nan P", "mheight-data", "nan.pkl", "mheight.source=pickles", spoil=pickled(
        "data/mheight/nan.pkl", pd.DataFrame({"n": [9], "k": [4], "m": [2], "P": [np.full((4, 5), np.nan)],
                                              "result": [3.0]}))),
    case("corpus source missing", "corpus", "no/such/stories.txt", "text.source=no/such/stories.txt"),
    case("corpus source empty", "corpus", "empty.txt", "text.source=empty.txt", spoil=write("empty.txt", "")),
    case("corpus source an empty folder", "corpus", "empty_dir", "text.source=empty_dir",
         spoil=lambda p: (p / "empty_dir").mkdir()),
    case("corpus source not utf-8", "corpus", "latin1.txt", "text.source=latin1.txt",
         spoil=write("latin1.txt", "Once upon a time, caf\xe9.\n".encode("latin-1"))),
    case("corpus text not utf-8", "tokenize", "train.txt",
         spoil=write("artifacts/text/corpus/train.txt", b"a b \xff c\n")),
    case("token file binary", "hmm-train", "tokens.txt", spoil=garbage(TOKENS)),
    case("token id out of vocabulary", "hmm-train", "tokens.txt", spoil=write(TOKENS, "1 2 999\n3 4\n")),
    case("hmm model random", "hmm-eval", "model.pt", spoil=garbage(HMM_MODEL)),
    case("hmm model truncated", "hmm-eval", "model.pt", spoil=truncate(HMM_MODEL)),
    case("hmm model of another kind", "synth", "model.pt",
         spoil=lambda p: shutil.copy(p / "artifacts/grok/model.pt", p / HMM_MODEL)),
    case("hmm checkpoint missing", "synth", "nope.pt", "synth.hmm_checkpoint=nope.pt"),
    case("manifest not json", "lm-train", "manifest.json", spoil=write("artifacts/synth/manifest.json", "{shards")),
    case("manifest lacks a key", "lm-train", "manifest.json",
         spoil=edit_json("artifacts/synth/manifest.json", lambda m: m.pop("seq_length"))),
    case("shard truncated", "lm-train", ".bin", spoil=lambda p: truncate(first_shard(p))(p)),
    case("val shard missing", "lm-eval", ".bin", spoil=lambda p: (p / first_shard(p, "val")).unlink()),
    case("lm config broken", "lm-eval", "config.json", spoil=write("artifacts/lm/model/config.json", "{")),
    case("lm weights random", "lm-eval", "artifacts/lm/model", spoil=garbage("artifacts/lm/model/model.safetensors")),
    case("revision config broken", "dormancy", "config.json", "dormancy.output_csv=artifacts/dormancy/new.csv",
         spoil=write(f"{STEP_2}/config.json", "[1")),  # a new CSV: the old one has this revision done
    case("source weights random", "activations", STEP_2, spoil=garbage(f"{STEP_2}/model.safetensors")),
    case("buffer garbage of the right size", "crosscoder-train", "activations.bin",
         spoil=garbage(f"{BUFFER}/activations.bin")),
    case("buffer meta not json", "crosscoder-train", "meta.json", spoil=write(f"{BUFFER}/meta.json", "not json")),
    case("buffer meta lacks a key", "crosscoder-train", "meta.json",
         spoil=edit_json(f"{BUFFER}/meta.json", lambda m: m.pop("rows"))),
    case("dormancy csv garbage", "dormancy", "results.csv", spoil=garbage("artifacts/dormancy/results.csv")),
    case("dormancy plot of a non-csv", "dormancy-plot", "model.pt", flags=("artifacts/grok/model.pt",)),
    # models handed over to start from
    case("grok init random bytes", "grok-train", "gift.pt", "grok.init_from=gift.pt", spoil=garbage("gift.pt", 500)),
    case("grok init of another kind", "grok-train", "model.pt", f"grok.init_from={HMM_MODEL}"),
    case("grok init unknown model", "grok-train", "no-such-model", "grok.init_from=models:/no-such-model@champion"),
    case("hmm init missing", "hmm-train", "nope.pt", "hmm.init_from=nope.pt"),
    case("lm init without config", "lm-train", "empty_dir", "lm.init_from=empty_dir",
         spoil=lambda p: (p / "empty_dir").mkdir()),
    case("crosscoder init of another kind", "crosscoder-train", "model.pt",
         "crosscoder.init_from=artifacts/grok/model.pt"),
    case("hmm init that runs code", "hmm-train", "evil.pt", "hmm.init_from=evil.pt",
         spoil=pickled("evil.pt", os.system)),  # unpickling would call os.system: a safe load refuses it
    # the lab's measurements and tools (issue 17)
    case("crosscoder length twice", "crosscoder-train", "crosscoder.epochs", "crosscoder.epochs=2"),
    case("crosscoder without a length", "crosscoder-train", "crosscoder.steps", "crosscoder.steps=0"),
    case("unknown penalty variant", "crosscoder-train", "crosscoder.decoder_norm_in_penalty",
         "crosscoder.decoder_norm_in_penalty=yes"),
    case("the old boolean penalty", "crosscoder-train", "crosscoder.decoder_norm_in_penalty",
         "crosscoder.decoder_norm_in_penalty=true"),
    case("negative update_freq", "hmm-train", "hmm.update_freq", "hmm.update_freq=-1"),
    case("train_unique not a bool", "hmm-train", "hmm.train_unique", "hmm.train_unique=some"),
    case("dormancy layer twice", "dormancy", "dormancy.layers", "dormancy.layers=[0,0]"),
    case("dormancy layer past the model", "dormancy", "dormancy.layers", "dormancy.layers=[5]",
         "dormancy.output_csv=artifacts/dormancy/new.csv"),
    case("dormancy profile missing", "dormancy", "nope.yaml", flags=("--profile", "nope.yaml")),
    case("dormancy profile unknown key", "dormancy", "dormancy.nope", flags=("--profile", "profile.yaml"),
         spoil=write("profile.yaml", "dormancy:\n  nope: 1\n")),
    case("lab token files missing", "corpus", "no/lab", "text.source=token-files:no/lab"),
    case("lab tokenizer not json", "corpus", "tokenizer.json", "text.source=token-files:lab",
         spoil=lab_files(tokenizer="{")),
    case("lab tokenizer without the period at 0", "corpus", "tokenizer.json", "text.source=token-files:lab",
         spoil=lab_files(tokenizer=json.dumps({"a": 0, ".": 1}))),
    case("lab token line without its 0", "corpus", "TinyStories-60-test.txt", "text.source=token-files:lab",
         spoil=lab_files(bad_file="TinyStories-60-test.txt")),
    case("hmm-eval model missing", "hmm-eval", "nope.pt", flags=("--model", "nope.pt")),
    case("hmm-eval model of another kind", "hmm-eval", "artifacts/grok/model.pt",
         flags=("--model", "artifacts/grok/model.pt")),
    case("hmm-sample model truncated", "hmm-sample", "model.pt", spoil=truncate(HMM_MODEL)),
    case("hmm-sample word outside the vocabulary", "hmm-sample", "'zyzzyva'", flags=("--prompt", "zyzzyva")),
    case("hmm-sample negative count", "hmm-sample", "--sentences", flags=("--sentences", "-1")),
    case("lm-sample model missing", "lm-sample", "nope", flags=("--model", "nope")),
    case("lm-sample weights random", "lm-sample", "artifacts/lm/model",
         spoil=garbage("artifacts/lm/model/model.safetensors")),
]


def snapshot(project: Path) -> dict[str, str]:
    return {str(p.relative_to(project)): hashlib.sha256(p.read_bytes()).hexdigest()
            for folder in ("artifacts", "data") for p in sorted((project / folder).rglob("*")) if p.is_file()}


def runs(project: Path, status: str) -> set[str]:
    with sqlite3.connect(project / "mlflow.db") as db:
        return {row[0] for row in db.execute("SELECT run_uuid FROM runs WHERE status = ?", (status,))}


def check_refused(project: Path, argv, names: str) -> subprocess.CompletedProcess:
    """Run `argv` in `project` and check the promise; returns what it printed."""
    before, finished = snapshot(project), runs(project, "FINISHED")
    done = run_labpipe(project, list(argv))
    assert done.returncode != 0, f"exit 0:\n{done.stdout[-1500:]}\n{done.stderr[-1500:]}"
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""
    assert names in last, f"the last line does not name {names!r}:\n{done.stderr[-1500:]}"
    assert snapshot(project) == before, "a failed stage changed files under artifacts/ or data/"
    assert runs(project, "RUNNING") == set(), "a failed stage left its MLflow run RUNNING"
    assert runs(project, "FINISHED") <= finished, "a failed stage marked its MLflow run FINISHED"
    return done


@pytest.fixture
def project(finished, tmp_path, monkeypatch) -> Path:
    copy = tmp_path / "project"
    shutil.copytree(finished, copy, symlinks=True)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{copy / 'mlflow.db'}")
    return copy


@pytest.mark.parametrize("bad", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_naming_it_and_changes_nothing(project, bad, monkeypatch):
    if "cuda" in bad.id and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    if bad.spoil is not None:
        bad.spoil(project)
    for key, value in bad.env:
        monkeypatch.setenv(key, value)
    check_refused(project, bad.argv, bad.names)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("uri", ["http://127.0.0.1:{port}", "sqlite:///{project}/no/such/folder/mlflow.db",
                                 "nonsense://x"])
def test_an_unusable_tracking_store_is_one_line_naming_it(project, monkeypatch, uri):
    uri = uri.format(port=_closed_port(), project=project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    before = snapshot(project)
    done = run_labpipe(project, ["grok-train", "--set=grok.epochs=7"])
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert uri in done.stderr.strip().splitlines()[-1], done.stderr[-1500:]
    assert snapshot(project) == before and not (project / "no").exists()


@pytest.fixture
def tiny_disk(tmp_path):
    """A 256 KiB tmpfs (root only); skipped where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.parametrize("argv", [
    ["synth", "--set=synth.out_dir={disk}", "--set=synth.train_shards=8", "--set=synth.sequences_per_shard=2048"],
    ["activations", "--set=crosscoder.buffer_dir={disk}/buffer", "--set=crosscoder.buffer_tokens=100000"],
], ids=["synth shards", "activation buffer"])
def test_an_output_larger_than_the_free_space_is_refused_with_both_numbers(project, tiny_disk, argv):
    done = check_refused(project, [a.format(disk=tiny_disk) for a in argv], str(tiny_disk))
    assert "are free" in done.stderr and not [p for p in tiny_disk.rglob("*") if p.is_file()]


def test_a_full_disk_mid_write_is_one_line_and_leaves_no_partial_file(project, tiny_disk):
    """20 shards of 128 bytes fit the free 56 KiB, but a tmpfs gives each file a 4 KiB page: the writes fail.
    The shards written before are kept (listed for a resume), the manifest is not touched, no partial file."""
    (tiny_disk / "filler").write_bytes(b"\0" * 200 * 1024)
    check_refused(project, ["synth", f"--set=synth.out_dir={tiny_disk}", "--set=synth.train_shards=20",
                            "--set=synth.sequences_per_shard=4", "--set=synth.block_sequences=4"], str(tiny_disk))
    progress = json.loads((tiny_disk / ".synth-progress.json").read_text())  # what a rerun with space resumes
    complete = {shard["file"]: shard["sha256"] for shard in progress["shards"]}
    names = {p.name for p in tiny_disk.iterdir()} - {"filler", ".synth-progress.json"}
    assert complete and set(complete) <= names and not [n for n in names if n.endswith(".tmp")]  # no partial file
    for name, sha256 in complete.items():
        assert hashlib.sha256((tiny_disk / name).read_bytes()).hexdigest() == sha256
