"""Stage synth: sample a sharded synthetic token dataset from an HMM; and synth-verify, its integrity check.

The HMM is hmm_train's checkpoint without its ends (`HMM.without_ends`): every sequence has exactly
synth.seq_length tokens, and each transition is conditioned on the sequence going on. The first state is drawn
from the HMM's start distribution or from the transition matrix's stationary one (synth.start).

Sampling (Walker's alias method). A row p of n probabilities becomes a table (prob, alias) with
p[j] = (prob[j] + sum of (1 - prob[i]) over the i with alias[i] = j) / n. A draw takes one uniform u: the column
j = floor(u n), kept when u n < j + prob[j], else alias[j]. That is O(1) per draw whatever n is, where
inverse-CDF sampling compares u against a whole row, O(n). One table row per transition row (plus one for the
first state) and one per emission row; a block of B sequences advances all B states with a handful of numpy
operations per time step, and then draws all B x L tokens at once (a token depends only on its state).
Work arrays are time-major (L, B), preallocated once, and reused for every block.

Shards. `sequences_per_shard` sequences of `seq_length` tokens, written as raw memmaps (manifest.py has the
format) under synth.out_dir: train_00000.bin ... then val_00000.bin ... Shard i of a split has its own
generator, default_rng(seed), whose seed is derived from (synth.seed, split, i) by numpy's SeedSequence and
recorded in the manifest, so shards are independent: `workers` processes write them in any order and the bytes
do not depend on how many there are. With permute_emissions, block b of a shard (rows b*B .. (b+1)*B - 1)
emits perm[x] for the HMM's symbol x, perm = block_permutation(permutation_seeds[b], K), its seed derived too.

Resume. A shard is written to a temp file and renamed into place, then the manifest (artifacts/synth/
manifest.json, the DVC output) is rewritten listing the complete shards. A restarted run keeps a listed shard
when the manifest's params_sha256 (every param a shard's bytes depend on, and the HMM's sha256) matches, the
shard entry is the one it would write, and the file's sha256 is the listed one; it writes every other shard.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from labpipe.config import Params, SynthParams, flatten
from labpipe.errors import InputError
from labpipe.files import atomic_path, require_free, sha256_file, write_json
from labpipe.hmm.model import HMM
from labpipe.inputs import read_json
from labpipe.synth.manifest import (
    FORMAT,
    MANIFEST,
    Shard,
    block_permutation,
    load_manifest,
    token_dtype,
    write_manifest,
)

SPLITS = ("train", "val")  # the split's position is part of its shards' seeds
SAMPLER_VERSION = 1  # part of params_sha256: bump it when the same seeds start giving other bytes

# ---- Walker's alias method --------------------------------------------------------------------------------------


def alias_table(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vose's O(n) construction of the alias table (prob, alias) of one row of probabilities.

    Each column j starts with mass n p[j] (1 on average). A column under 1 is topped up by a column over 1,
    which becomes its alias and loses what it gave; whatever is left is 1 up to rounding.
    """
    n = len(p)
    mass = (np.asarray(p, dtype=np.float64) / np.sum(p) * n).tolist()
    prob = [1.0] * n
    alias = list(range(n))  # a full column (prob 1) never uses its alias: itself
    small = [j for j in range(n) if mass[j] < 1]
    large = [j for j in range(n) if mass[j] >= 1]
    while small and large:
        j, donor = small.pop(), large.pop()
        prob[j], alias[j] = mass[j], donor
        mass[donor] = (mass[donor] + mass[j]) - 1  # in this order: the more accurate one
        (small if mass[donor] < 1 else large).append(donor)
    return np.array(prob), np.array(alias)


def alias_tables(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The alias tables of every row: prob (R, n) float64, alias (R, n) int64."""
    tables = [alias_table(row) for row in np.asarray(rows, dtype=np.float64)]
    return np.stack([prob for prob, _ in tables]), np.stack([alias for _, alias in tables])


class BlockSampler:
    """Samples blocks of up to `block` sequences of `length` states and symbols from an HMM without ends.

    The transition table has one row more than the HMM, the first state's distribution, so that the first
    step is a step like the others. The chain is kept as row offsets into the flattened table (state * H), and
    the aliases are offsets too: a step is six numpy calls over the block, with no conversion between them.
    """

    def __init__(self, first: np.ndarray, transition: np.ndarray, emission: np.ndarray, length: int, block: int):
        self.n_states, self.n_symbols = emission.shape
        self.length, self.block = length, block
        h, e = self.n_states, self.n_symbols
        index = np.int32 if h * max(h + 1, e) < 2**31 else np.int64  # half the memory traffic of int64

        prob, alias = alias_tables(np.vstack([transition, first[None]]))
        self.first_row = h * h  # offset of the first state's row
        self.step_cut = (np.arange(h) + prob).ravel()  # u h < j + prob[j] keeps column j
        self.step_alias = (alias * h).astype(index).ravel()
        prob, alias = alias_tables(emission)
        self.emit_cut = (np.arange(e) + prob).ravel()
        self.emit_alias = alias.astype(index).ravel()

        size = length * block
        self._u = np.empty(size)
        self._cut = np.empty(size)
        self._keep = np.empty(size, dtype=bool)
        self._column = np.empty(size, dtype=index)
        self._flat = np.empty(size, dtype=index)
        self._states = np.empty(size, dtype=index)
        self._symbols = np.empty(size, dtype=index)

    def sample(self, rng: np.random.Generator, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(states, symbols) of n sequences (default: a whole block), both (n, length), drawn from rng: all
        the state uniforms (time-major), then all the symbol uniforms. Views of buffers the next call reuses."""
        n = self.block if n is None else n
        if not 0 < n <= self.block:
            raise InputError(f"n={n} sequences: expected 1 to {self.block}")
        u, cut, keep, column, flat, states, symbols = (
            buffer[: self.length * n].reshape(self.length, n)
            for buffer in (self._u, self._cut, self._keep, self._column, self._flat, self._states, self._symbols))
        h, e = self.n_states, self.n_symbols

        self._columns(rng, u, column, h)
        previous = self.first_row
        for t in range(self.length):  # states: sequential in t, vectorized over the n sequences
            np.add(column[t], previous, out=flat[t])
            np.take(self.step_cut, flat[t], out=cut[t], mode="clip")  # clip: no checks (indices are valid)
            np.less(u[t], cut[t], out=keep[t])
            np.take(self.step_alias, flat[t], out=states[t], mode="clip")
            np.multiply(column[t], h, out=flat[t])  # the kept column's own row offset
            np.copyto(states[t], flat[t], where=keep[t])
            previous = states[t]
        np.floor_divide(states, h, out=states)  # row offsets -> states

        self._columns(rng, u, column, e)  # symbols: all at once
        np.multiply(states, e, out=flat)
        flat += column
        np.take(self.emit_cut, flat, out=cut, mode="clip")
        np.less(u, cut, out=keep)
        np.take(self.emit_alias, flat, out=symbols, mode="clip")
        np.copyto(symbols, column, where=keep)
        return states.T, symbols.T

    @staticmethod
    def _columns(rng: np.random.Generator, u: np.ndarray, column: np.ndarray, n: int) -> None:
        """u <- uniforms times n, column <- floor(u): the column each draw looks at."""
        rng.random(out=u)
        u *= n
        np.copyto(column, u, casting="unsafe")  # truncation is floor for u >= 0
        np.minimum(column, n - 1, out=column)  # u within 2**-53 of 1 rounds u * n up to n


def start_distribution(hmm: HMM, start: str) -> np.ndarray:
    """The first state's distribution: the HMM's start, or the stationary law of its transition matrix."""
    if start not in ("initial", "stationary"):
        raise InputError(f"synth.start must be initial or stationary, got {start!r}")
    return (hmm.start if start == "initial" else hmm.stationary()).to(torch.float64).numpy()


# ---- seeds ------------------------------------------------------------------------------------------------------


def derived_seed(seed: int, *key: int) -> int:
    return int(np.random.SeedSequence(entropy=seed, spawn_key=key).generate_state(1, np.uint64)[0])


def shard_seed(seed: int, split: str, index: int) -> int:
    return derived_seed(seed, SPLITS.index(split), index, 0)


def permutation_seed(seed: int, split: str, index: int, block: int) -> int:
    return derived_seed(seed, SPLITS.index(split), index, 1, block)


def plan_shards(s: SynthParams) -> list[Shard]:
    """Every shard of the dataset, in manifest order, as it will be listed (less its sha256)."""
    blocks = -(-s.sequences_per_shard // s.block_sequences) if s.permute_emissions else 0
    planned = []
    for split, count in zip(SPLITS, (s.train_shards, s.val_shards), strict=True):
        for index in range(count):
            planned.append(Shard(split=split, index=index, file=f"{split}_{index:05d}.bin",
                                 tokens=s.sequences_per_shard * s.seq_length, sequences=s.sequences_per_shard,
                                 sha256="", seed=shard_seed(s.seed, split, index),
                                 permutation_seeds=tuple(permutation_seed(s.seed, split, index, block)
                                                         for block in range(blocks))))
    return planned


# ---- writing shards ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardSpec:
    """What every shard of a run shares: small and picklable, sent once to each worker process."""

    first: np.ndarray  # (H,) the first state's distribution
    transition: np.ndarray  # (H, H) without ends
    emission: np.ndarray  # (H, K)
    seq_length: int
    block_sequences: int
    out_dir: Path


class ShardWriter:
    """Writes shards with one BlockSampler (its buffers allocated once, in the process that writes)."""

    def __init__(self, spec: ShardSpec):
        self.spec = spec
        self.sampler = BlockSampler(spec.first, spec.transition, spec.emission, spec.seq_length,
                                    spec.block_sequences)
        self.vocab_size = spec.emission.shape[1]
        self.dtype = token_dtype(self.vocab_size)
        self.identity = np.arange(self.vocab_size, dtype=self.dtype)

    def write(self, planned: Shard) -> Shard:
        """Sample the shard block by block into a temp file renamed into place; the listed Shard."""
        rng = np.random.default_rng(planned.seed)
        digest = hashlib.sha256()
        block = self.spec.block_sequences
        with atomic_path(self.spec.out_dir / planned.file) as tmp, open(tmp, "wb") as f:
            for b, first_row in enumerate(range(0, planned.sequences, block)):
                _, symbols = self.sampler.sample(rng, min(block, planned.sequences - first_row))
                token_of = (block_permutation(planned.permutation_seeds[b], self.vocab_size).astype(self.dtype)
                            if planned.permutation_seeds else self.identity)
                tokens = np.take(token_of, symbols)  # (n, L), C order: the shard's rows
                f.write(tokens.data)
                digest.update(tokens.data)
        return dataclasses.replace(planned, sha256=digest.hexdigest())


_worker_writer: ShardWriter | None = None  # a worker process's own


def _start_worker(spec: ShardSpec) -> None:
    global _worker_writer
    _worker_writer = ShardWriter(spec)


def _write_in_worker(planned: Shard) -> Shard:
    return _worker_writer.write(planned)


def write_shards(spec: ShardSpec, planned: list[Shard], workers: int) -> Iterator[Shard]:
    """Write the shards, yielding each as it completes: in order in this process (workers=1), else in
    completion order from `workers` spawned processes (spawn: no fork of a process with threads and torch)."""
    if workers == 1 or len(planned) <= 1:
        writer = ShardWriter(spec)
        for shard in planned:
            yield writer.write(shard)
        return
    pool = ProcessPoolExecutor(min(workers, len(planned)), mp_context=multiprocessing.get_context("spawn"),
                               initializer=_start_worker, initargs=(spec,))
    try:
        for future in as_completed([pool.submit(_write_in_worker, shard) for shard in planned]):
            yield future.result()
    finally:
        pool.shutdown(cancel_futures=True)  # an error or an interrupt: do not start the queued shards


# ---- the stage --------------------------------------------------------------------------------------------------


def load_hmm(path: str) -> HMM:
    """hmm_train's HMM (float64), without its ends: an InputError when the file or a state's way on is missing."""
    if not Path(path).exists():
        raise InputError(f"synth.hmm_checkpoint {path} does not exist: run hmm_train first, or point it at a "
                         "file holding {'hmm': HMM.state_dict()}")
    return HMM.load(path).without_ends()


def params_fingerprint(s: SynthParams, hmm_sha256: str) -> str:
    """sha256 of what a shard's bytes depend on. Not the shard counts, workers, out_dir or the checkpoint's path:
    raising train_shards keeps the shards already written."""
    keys = {"sampler": SAMPLER_VERSION, "hmm_sha256": hmm_sha256, "seq_length": s.seq_length,
            "sequences_per_shard": s.sequences_per_shard, "block_sequences": s.block_sequences, "start": s.start,
            "permute_emissions": s.permute_emissions, "seed": s.seed}
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()


SUPERSEDED = "superseded"  # shards of other params, kept


def progress_file(out_dir: Path) -> Path:
    """Where a run lists its complete shards as it goes (for a resume after a kill): the manifest itself is
    replaced only when every shard is written."""
    return out_dir / ".synth-progress.json"


def listings(out_dir: Path) -> Iterator[dict]:
    """The shard listings there are: the manifest and an unfinished run's progress in out_dir."""
    for listing in (MANIFEST, progress_file(out_dir)):
        if listing.exists():
            yield read_json(listing, "synthetic-data manifest", ("shards", "params_sha256", "out_dir"))


def keep_other_runs(header: dict, out_dir: Path) -> None:
    """Shards in out_dir that the manifest (or an unfinished run's progress) lists for other params would be
    overwritten: they move to out_dir/superseded/<their params_sha256[:16]>/ with their listing. This run's own,
    moved there by an earlier run of other params, come back (and are then reused, not sampled again)."""
    for old in listings(out_dir):
        if old["params_sha256"] == header["params_sha256"] or Path(old["out_dir"]).resolve() != out_dir.resolve():
            continue
        present = [entry["file"] for entry in old["shards"] if (out_dir / entry["file"]).exists()]
        if present:
            aside = out_dir / SUPERSEDED / old["params_sha256"][:16]
            aside.mkdir(parents=True, exist_ok=True)
            for name in present:
                os.replace(out_dir / name, aside / name)
            write_json(aside / MANIFEST.name, old)
            print(f"synth: {len(present)} shards of other params moved to {aside} (they come back with those "
                  "params)", file=sys.stderr)
    mine = out_dir / SUPERSEDED / header["params_sha256"][:16]
    if (mine / MANIFEST.name).exists():
        listing = read_json(mine / MANIFEST.name, "synthetic-data manifest", ("shards",))
        for entry in listing["shards"]:
            if (mine / entry["file"]).exists():
                os.replace(mine / entry["file"], out_dir / entry["file"])
        write_json(progress_file(out_dir), listing)  # what reusable_shards checks and keeps
        shutil.rmtree(mine)
        print(f"synth: shards made earlier with these params are back from {mine}", file=sys.stderr)


def reusable_shards(header: dict, planned: list[Shard], out_dir: Path) -> dict[str, Shard]:
    """The shards of the existing manifest, or of an unfinished run's progress, that this run would write byte
    for byte, by file name."""
    entries = [entry for old in listings(out_dir) if old.get("format") == FORMAT
               and old["params_sha256"] == header["params_sha256"] for entry in old["shards"]]
    wanted = {shard.file: shard for shard in planned}
    reusable = {}
    for entry in tqdm(entries, desc="synth: checking the listed shards", unit="shard", leave=False):
        shard = Shard(**{**entry, "permutation_seeds": tuple(entry["permutation_seeds"])})
        path = out_dir / shard.file
        if (wanted.get(shard.file) == dataclasses.replace(shard, sha256="") and path.exists()
                and sha256_file(path) == shard.sha256):
            reusable[shard.file] = shard
    return reusable


def run_synth(params: Params) -> None:
    """Stage synth."""
    from labpipe.tracking import stage_run

    s = params.synth
    hmm = load_hmm(s.hmm_checkpoint)
    out_dir = Path(s.out_dir)
    hmm_sha256 = sha256_file(s.hmm_checkpoint)
    header = {"dtype": token_dtype(hmm.n_symbols).str, "vocab_size": hmm.n_symbols, "seq_length": s.seq_length,
              "sequences_per_shard": s.sequences_per_shard, "start": s.start,
              "permute_emissions": s.permute_emissions, "block_sequences": s.block_sequences,
              "hmm": {"path": s.hmm_checkpoint, "sha256": hmm_sha256, "hidden_states": hmm.n_states},
              "out_dir": s.out_dir, "params_sha256": params_fingerprint(s, hmm_sha256)}
    planned = plan_shards(s)
    keep_other_runs(header, out_dir)
    done = reusable_shards(header, planned, out_dir)

    def save_progress() -> None:  # only complete shards, in plan order
        write_manifest(progress_file(out_dir), header, [done[shard.file] for shard in planned if shard.file in done])

    for shard in planned:  # temp files of a killed run
        for stale in out_dir.glob(f".{shard.file}.*.tmp"):
            stale.unlink()
    todo = [shard for shard in planned if shard.file not in done]
    require_free(out_dir, sum(shard.tokens for shard in todo) * token_dtype(hmm.n_symbols).itemsize, "synth.out_dir")
    spec = ShardSpec(start_distribution(hmm, s.start), hmm.transition.numpy(), hmm.emission.numpy(), s.seq_length,
                     s.block_sequences, out_dir)

    with stage_run(params.tracking, "synth", flatten(s, "synth.")) as run:
        total = sum(shard.tokens for shard in planned)
        started = time.perf_counter()
        with tqdm(total=total, initial=total - sum(shard.tokens for shard in todo), desc="synth", unit="tok",
                  unit_scale=True) as bar:
            for shard in write_shards(spec, todo, s.workers):
                done[shard.file] = shard
                save_progress()
                bar.update(shard.tokens)
        write_manifest(MANIFEST, header, [done[shard.file] for shard in planned])
        progress_file(out_dir).unlink(missing_ok=True)
        seconds = time.perf_counter() - started
        generated = sum(shard.tokens for shard in todo)
        run.log_metrics({"tokens": total, "shards": len(planned), "generated_tokens": generated,
                         "generated_shards": len(todo), "seconds": seconds,
                         "tokens_per_s": generated / seconds if todo else 0.0}, step=0)
        run.log_outputs([MANIFEST])
    print(f"synth: {len(planned)} shards, {total:,} tokens in {out_dir} ({len(todo)} written at "
          f"{generated / max(seconds, 1e-9):,.0f} tokens/s, {len(planned) - len(todo)} kept); manifest {MANIFEST}")


def run_verify(params: Params) -> None:
    """synth-verify: every shard of the manifest against its sha256; ShardError names the first bad one."""
    manifest = load_manifest(MANIFEST)  # ShardError: a listed shard missing or of the wrong size
    for shard in tqdm(manifest.shards, desc="synth-verify", unit="shard"):
        manifest.verify(shard)
    counts = ", ".join(f"{len(manifest.split(split))} {split}" for split in SPLITS)
    tokens = sum(shard.tokens for shard in manifest.shards)
    print(f"synth-verify: all {len(manifest.shards)} shards ({counts}; {tokens:,} tokens) in {manifest.out_dir} "
          f"match {MANIFEST}")

