"""The synthetic dataset's manifest: the contract between stage synth and the stages that read its shards.

A shard is a raw C-order array of shape (sequences, seq_length) in the manifest's dtype (uint16 when the
vocabulary fits, else uint32), little-endian, with no header: np.memmap opens it without reading it.
The manifest (JSON, the DVC output of stage synth) lists every complete shard:

    {"format": 1, "dtype": "<u2", "vocab_size": K, "seq_length": L, "sequences_per_shard": n,
     "start": "stationary", "permute_emissions": false, "block_sequences": B,
     "hmm": {"path": ..., "sha256": ..., "hidden_states": H},
     "out_dir": "...",                      # shard files are relative to it
     "shards": [{"split": "train", "index": 0, "file": "train_00000.bin", "tokens": n * L, "sequences": n,
                 "sha256": ..., "seed": ..., "permutation_seeds": [...]}, ...]}

With permute_emissions, the sequences of block b of a shard (rows b*B .. (b+1)*B - 1) emit perm[x] where x
is the HMM's symbol and perm = block_permutation(permutation_seeds[b], K): any sequence can be regenerated
and its generating HMM rebuilt (permuted_hmm).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from labpipe.errors import InputError, UserError
from labpipe.files import sha256_file, write_json
from labpipe.hmm.model import HMM
from labpipe.inputs import read_json, reason

MANIFEST = Path("artifacts/synth/manifest.json")
FORMAT = 1


class ShardError(UserError, RuntimeError):
    """A shard that is missing, of the wrong size, or whose sha256 differs from the manifest's."""

    exit_code = 1


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


@dataclass(frozen=True)
class Shard:
    split: str
    index: int
    file: str
    tokens: int
    sequences: int
    sha256: str
    seed: int
    permutation_seeds: tuple[int, ...]


@dataclass(frozen=True)
class Manifest:
    path: Path
    dtype: np.dtype
    vocab_size: int
    seq_length: int
    sequences_per_shard: int
    start: str
    permute_emissions: bool
    block_sequences: int
    hmm: dict
    out_dir: Path
    shards: tuple[Shard, ...]

    def split(self, name: str) -> list[Shard]:
        return [shard for shard in self.shards if shard.split == name]

    def shard_path(self, shard: Shard) -> Path:
        return self.out_dir / shard.file

    def open(self, shard: Shard) -> np.memmap:
        """The shard as a read-only (sequences, seq_length) memmap: pages are read when touched, and shared
        between processes through the page cache."""
        path = self.shard_path(shard)
        expected = shard.sequences * self.seq_length * self.dtype.itemsize
        if not path.exists():
            raise ShardError(f"shard {path} listed in {self.path} is missing")
        if path.stat().st_size != expected:
            raise ShardError(f"shard {path} has {path.stat().st_size} bytes, {self.path} says {expected}")
        return np.memmap(path, dtype=self.dtype, mode="r", shape=(shard.sequences, self.seq_length))

    def verify(self, shard: Shard) -> None:
        """ShardError unless the shard's bytes hash to the manifest's sha256."""
        self.open(shard)  # exists, right size
        actual = sha256_file(self.shard_path(shard))
        if actual != shard.sha256:
            raise ShardError(f"shard {self.shard_path(shard)} is corrupt: sha256 {actual}, {self.path} says "
                             f"{shard.sha256}")

    def permutation(self, shard: Shard, row: int) -> np.ndarray | None:
        """The symbol permutation of a shard's row (None without permute_emissions)."""
        if not self.permute_emissions:
            return None
        return block_permutation(shard.permutation_seeds[row // self.block_sequences], self.vocab_size)


def block_permutation(seed: int, vocab_size: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(vocab_size)


def permuted_hmm(hmm: HMM, permutation: np.ndarray | None) -> HMM:
    """The HMM whose symbol perm[x] is the original's x: emission[:, perm[x]] = original emission[:, x]."""
    if permutation is None:
        return hmm
    emission = hmm.emission[:, np.argsort(permutation)]
    return HMM(hmm.start, hmm.transition, hmm.end, emission)


def write_manifest(path: str | Path, header: dict, shards: list[Shard]) -> None:
    write_json(path, {"format": FORMAT, **header, "shards": [dataclasses.asdict(shard) for shard in shards]})


MANIFEST_KEYS = ("format", "dtype", "vocab_size", "seq_length", "sequences_per_shard", "start", "permute_emissions",
                 "block_sequences", "hmm", "out_dir", "shards")


def load_manifest(path: str | Path = MANIFEST) -> Manifest:
    """Read and check a manifest (every listed shard's presence and size; not its hash: see Manifest.verify)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"no synthetic-data manifest at {path}: run the synth stage first")
    raw = read_json(path, "synthetic-data manifest", MANIFEST_KEYS)
    if raw.get("format") != FORMAT:
        raise InputError(f"{path}: manifest format {raw.get('format')!r}, this labpipe reads format {FORMAT}")
    try:
        shards = tuple(Shard(**{**s, "permutation_seeds": tuple(s["permutation_seeds"])}) for s in raw["shards"])
    except (TypeError, KeyError) as error:
        raise InputError(f"{path}: a shard record is not labpipe's ({reason(error)})") from None
    manifest = Manifest(
        path=path, dtype=np.dtype(raw["dtype"]), vocab_size=raw["vocab_size"], seq_length=raw["seq_length"],
        sequences_per_shard=raw["sequences_per_shard"], start=raw["start"],
        permute_emissions=raw["permute_emissions"], block_sequences=raw["block_sequences"], hmm=raw["hmm"],
        out_dir=Path(raw["out_dir"]), shards=shards,
    )
    for shard in shards:
        manifest.open(shard)
    return manifest
