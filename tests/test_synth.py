"""Stage synth and synth-verify, checked against independent computations: exact alias-table masses, sampled
frequencies within a few standard errors of the HMM, seeds re-derived by hand, hashes of the files' bytes."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from conftest import write_params
from labpipe import registry
from labpipe.cli import main
from labpipe.config import load_params
from labpipe.hmm import HMM
from labpipe.synth.generate import (
    BlockSampler,
    alias_table,
    alias_tables,
    progress_file,
    run_synth,
    run_verify,
    start_distribution,
)
from labpipe.synth.manifest import MANIFEST, ShardError, load_manifest, permuted_hmm

# ---- alias tables and the sampler ----------------------------------------------------------------------------


def _encoded(prob: np.ndarray, alias: np.ndarray) -> np.ndarray:
    """The distribution a table encodes: column j is picked with 1/n, kept with prob[j], else gives alias[j]."""
    n = len(prob)
    return (prob + np.bincount(alias, weights=1 - prob, minlength=n)) / n


def test_alias_tables_encode_each_row_exactly():
    rng = np.random.default_rng(0)
    sparse = rng.exponential(size=300) * (rng.random(300) < 0.3)
    rows = [[1.0], [0.5, 0.5], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.1, 0.0, 0.6, 0.3], [0.25] * 4,
            [1e-12, 1 - 1e-12], rng.dirichlet(np.ones(7)), sparse / sparse.sum(), rng.dirichlet(np.full(1000, 0.1))]
    for row in rows:
        row = np.asarray(row)
        prob, alias = alias_table(row)
        assert np.all((prob >= 0) & (prob <= 1)) and np.all((alias >= 0) & (alias < len(row)))
        np.testing.assert_allclose(_encoded(prob, alias), row, rtol=0, atol=1e-12)
        assert np.all(_encoded(prob, alias)[row == 0] == 0)  # exactly: a zero is never drawn

    matrix = rng.dirichlet(np.ones(6), size=4)
    prob, alias = alias_tables(matrix)
    assert prob.shape == alias.shape == (4, 6)
    for r in range(4):
        np.testing.assert_allclose(_encoded(prob[r], alias[r]), matrix[r], rtol=0, atol=1e-12)


def _hand_hmm() -> HMM:
    """Zeros in the transitions, an end probability to condition away, a one-hot emission row."""
    return HMM(start=torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64),
               transition=torch.tensor([[0.5, 0.3, 0.0], [0.1, 0.1, 0.7], [0.0, 0.4, 0.6]], dtype=torch.float64),
               end=torch.tensor([0.2, 0.1, 0.0], dtype=torch.float64),
               emission=torch.tensor([[0.7, 0.3, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.1, 0.2, 0.3, 0.4]],
                                     dtype=torch.float64))


def _assert_frequencies(counts: np.ndarray, expected: np.ndarray, what: str) -> None:
    """Each row of counts against its expected distribution: within 5 standard errors, zeros never drawn."""
    totals = counts.sum(-1, keepdims=True)
    frequencies = counts / totals
    tolerance = 5 * np.sqrt(expected * (1 - expected) / totals)
    assert np.all(counts[expected == 0] == 0), what
    assert np.all(np.abs(frequencies - expected) <= tolerance + 1e-12), (what, frequencies, expected)


@pytest.mark.parametrize("start", ["initial", "stationary"])
def test_sampled_frequencies_match_the_hmm(start):
    hmm = _hand_hmm()
    moves = hmm.transition.numpy() / hmm.transition.numpy().sum(1, keepdims=True)  # conditioned on going on
    eigenvalues, vectors = np.linalg.eig(moves.T)
    stationary = np.real(vectors[:, np.argmin(np.abs(eigenvalues - 1))])
    first = {"initial": hmm.start.numpy(), "stationary": stationary / stationary.sum()}[start]

    goes_on = hmm.without_ends()
    sampler = BlockSampler(start_distribution(goes_on, start), goes_on.transition.numpy(), goes_on.emission.numpy(),
                           length=30, block=4000)
    rng = np.random.default_rng(1)
    blocks = [tuple(a.copy() for a in sampler.sample(rng)) for _ in range(5)]
    blocks.append(tuple(a.copy() for a in sampler.sample(rng, n=1234)))  # a partial block uses the same buffers
    assert blocks[-1][0].shape == blocks[-1][1].shape == (1234, 30)
    states = np.concatenate([s for s, _ in blocks])
    symbols = np.concatenate([x for _, x in blocks])
    assert states.shape == (21234, 30)

    _assert_frequencies(np.bincount(states[:, 0], minlength=3), first, "first state")
    pairs = np.bincount((states[:, :-1] * 3 + states[:, 1:]).ravel(), minlength=9).reshape(3, 3)
    _assert_frequencies(pairs, moves, "transitions")
    emitted = np.bincount((states * 4 + symbols).ravel(), minlength=12).reshape(3, 4)
    _assert_frequencies(emitted, hmm.emission.numpy(), "emissions")


# ---- the stage ------------------------------------------------------------------------------------------------


def _synth_project(directory: Path, repo_params: dict, hmm: HMM | None = None, **synth) -> None:
    torch.save({"hmm": (hmm or HMM.random(5, 7, seed=3)).state_dict()}, directory / "hmm.pt")
    write_params(directory, {**repo_params, "synth": {
        **repo_params["synth"], "hmm_checkpoint": "hmm.pt", "seq_length": 16, "sequences_per_shard": 40,
        "train_shards": 3, "val_shards": 2, "block_sequences": 16, "workers": 1, "out_dir": "shards", **synth}})


def _shard_bytes(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.glob("*.bin"))}


def _seed(seed: int, *key: int) -> int:
    return int(np.random.SeedSequence(seed, spawn_key=key).generate_state(1, np.uint64)[0])


def test_synth_writes_the_shards_and_manifest_of_the_contract(project):
    directory, repo_params = project
    _synth_project(directory, repo_params, seed=7)
    params = load_params("params.yaml")
    run_synth(params)

    raw = json.loads(MANIFEST.read_text())
    assert {k: raw[k] for k in ("dtype", "vocab_size", "seq_length", "sequences_per_shard", "start",
                                "permute_emissions", "block_sequences", "out_dir")} == {
        "dtype": "<u2", "vocab_size": 7, "seq_length": 16, "sequences_per_shard": 40, "start": "stationary",
        "permute_emissions": False, "block_sequences": 16, "out_dir": "shards"}
    assert raw["hmm"] == {"path": "hmm.pt", "sha256": hashlib.sha256(Path("hmm.pt").read_bytes()).hexdigest(),
                          "hidden_states": 5}
    assert len(raw["params_sha256"]) == 64

    manifest = load_manifest()
    assert [s.file for s in manifest.shards] == ["train_00000.bin", "train_00001.bin", "train_00002.bin",
                                                 "val_00000.bin", "val_00001.bin"]
    hmm = HMM.from_state_dict(torch.load("hmm.pt")["hmm"]).without_ends()
    sampler = BlockSampler(start_distribution(hmm, "stationary"), hmm.transition.numpy(), hmm.emission.numpy(),
                           length=16, block=16)
    for shard in manifest.shards:
        data = (directory / "shards" / shard.file).read_bytes()
        assert len(data) == 40 * 16 * 2 and shard.tokens == 640 and shard.sequences == 40
        assert shard.sha256 == hashlib.sha256(data).hexdigest()
        assert shard.seed == _seed(7, ("train", "val").index(shard.split), shard.index, 0)
        assert shard.permutation_seeds == () and manifest.permutation(shard, 0) is None
        # the shard is its generator's blocks of 16, 16 and 8 sequences, rows in order
        rng = np.random.default_rng(shard.seed)
        expected = np.concatenate([sampler.sample(rng, n)[1].copy() for n in (16, 16, 8)])
        np.testing.assert_array_equal(manifest.open(shard), expected)
    assert len({s.sha256 for s in manifest.shards}) == 5

    experiment = MlflowClient().get_experiment_by_name(registry.line_of("synth").experiment)
    run = MlflowClient().search_runs([experiment.experiment_id])[0]
    assert run.data.tags["labpipe.stage"] == "synth" and run.data.tags["dvc.outs"] == str(MANIFEST)
    assert run.data.params["synth.seed"] == "7"
    assert run.data.metrics["tokens"] == 5 * 640 and run.data.metrics["generated_shards"] == 5
    assert run.data.metrics["tokens_per_s"] > 0


def test_the_same_seeds_give_the_same_bytes_with_one_or_two_workers(project):
    directory, repo_params = project
    _synth_project(directory, repo_params, workers=1, out_dir="one")
    run_synth(load_params("params.yaml"))
    one = load_manifest().shards
    _synth_project(directory, repo_params, workers=2, out_dir="two")
    run_synth(load_params("params.yaml"))
    assert load_manifest().shards == one
    assert _shard_bytes(directory / "two") == _shard_bytes(directory / "one")
    assert len(_shard_bytes(directory / "one")) == 5


def test_a_rerun_keeps_exactly_the_shards_it_would_write(project):
    directory, repo_params = project
    _synth_project(directory, repo_params)
    run_synth(load_params("params.yaml"))
    shards = directory / "shards"
    original = _shard_bytes(shards)

    def inodes() -> dict[str, int]:  # a rewritten shard is a new file (temp file, then rename)
        return {path.name: path.stat().st_ino for path in shards.glob("*.bin")}

    before = inodes()
    run_synth(load_params("params.yaml"))
    assert inodes() == before

    corrupt = bytearray(original["train_00001.bin"])
    corrupt[100] ^= 0xFF
    (shards / "train_00001.bin").write_bytes(bytes(corrupt))
    before = inodes()
    run_synth(load_params("params.yaml"))
    after = inodes()
    assert [name for name in before if after[name] != before[name]] == ["train_00001.bin"]
    assert _shard_bytes(shards) == original

    _synth_project(directory, repo_params, train_shards=4)  # more shards: the existing ones are the same bytes
    before = inodes()
    run_synth(load_params("params.yaml"))
    assert {name: ino for name, ino in inodes().items() if name in before} == before
    assert [s.file for s in load_manifest().shards][3:] == ["train_00003.bin", "val_00000.bin", "val_00001.bin"]

    _synth_project(directory, repo_params, train_shards=4, seed=1)  # another seed: nothing is kept
    before = inodes()
    run_synth(load_params("params.yaml"))
    after = inodes()
    assert all(after[name] != before[name] for name in before)
    assert all(_shard_bytes(shards)[name] != data for name, data in original.items())


KILL_IN_SHARD_3 = """
import os, signal, sys
import labpipe.synth.generate as generate
real_write_manifest, real_sample = generate.write_manifest, generate.BlockSampler.sample
listed, samples_of_third = [], []

def write_manifest(path, header, shards):
    real_write_manifest(path, header, shards)
    listed.append(len(shards))

def sample(self, rng, n=None):  # SIGKILL in the third shard, its first block written to its temp file
    if listed and listed[-1] == 2:
        samples_of_third.append(n)
        if len(samples_of_third) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    return real_sample(self, rng, n)

generate.write_manifest, generate.BlockSampler.sample = write_manifest, sample
from labpipe.cli import main
sys.exit(main(["synth"]))
"""


def _labpipe(directory: Path, *args: str, script: str | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", script] if script else [sys.executable, "-m", "labpipe", *args]
    return subprocess.run(command, cwd=directory, capture_output=True, text=True, timeout=300)


def test_a_killed_run_resumes_to_the_same_shards(project):
    directory, repo_params = project
    _synth_project(directory, repo_params, train_shards=4, val_shards=1)
    run_synth(load_params("params.yaml"))
    reference, reference_shards = _shard_bytes(directory / "shards"), load_manifest().shards
    for path in (directory / "shards").iterdir():
        path.unlink()
    MANIFEST.unlink()

    killed = _labpipe(directory, script=KILL_IN_SHARD_3)
    assert killed.returncode == -9, killed.stderr
    assert not MANIFEST.exists()  # the manifest comes last; the run's progress lists the complete shards
    progress = load_manifest(progress_file(directory / "shards"))
    assert [s.file for s in progress.shards] == ["train_00000.bin", "train_00001.bin"]
    assert not (directory / "shards" / "train_00002.bin").exists()
    assert len(list((directory / "shards").glob(".train_00002.bin.*.tmp"))) == 1  # never listed
    kept = {name: (directory / "shards" / name).stat().st_ino for name in ("train_00000.bin", "train_00001.bin")}

    resumed = _labpipe(directory, "synth")
    assert resumed.returncode == 0, resumed.stderr
    assert "3 written" in resumed.stdout and "2 kept" in resumed.stdout
    assert load_manifest().shards == reference_shards  # each shard listed once, in order
    assert _shard_bytes(directory / "shards") == reference
    assert {name: (directory / "shards" / name).stat().st_ino for name in kept} == kept
    assert not list((directory / "shards").glob(".*.tmp")) and not progress_file(directory / "shards").exists()


def test_other_params_move_the_shards_aside_and_the_first_params_bring_them_back(project, capsys):
    directory, repo_params = project
    _synth_project(directory, repo_params)
    run_synth(load_params("params.yaml"))
    first, manifest = _shard_bytes(directory / "shards"), MANIFEST.read_bytes()
    run_synth(load_params("params.yaml", ["synth.seed=1"]))
    [aside] = (directory / "shards" / "superseded").iterdir()
    assert _shard_bytes(aside) == first  # every shard of the first params kept, byte for byte
    assert _shard_bytes(directory / "shards") != first and MANIFEST.read_bytes() != manifest
    seconds, seconds_manifest = _shard_bytes(directory / "shards"), MANIFEST.read_bytes()
    capsys.readouterr()
    run_synth(load_params("params.yaml"))  # the first params again: their shards come back, none is sampled
    said = capsys.readouterr()
    assert "moved to shards/superseded/" in said.err and "are back from" in said.err and "(0 written" in said.out
    assert _shard_bytes(directory / "shards") == first and MANIFEST.read_bytes() == manifest
    [aside] = (directory / "shards" / "superseded").iterdir()
    assert _shard_bytes(aside) == seconds and json.loads((aside / "manifest.json").read_bytes()) == json.loads(
        seconds_manifest)


def _cycle_hmm(states: int) -> HMM:
    """State i always moves to i + 1 (mod H) and emits symbol i: a row's tokens give away its states."""
    eye = torch.eye(states, dtype=torch.float64)
    return HMM(torch.full((states,), 1 / states, dtype=torch.float64), eye.roll(1, dims=1),
               torch.zeros(states, dtype=torch.float64), eye)


def test_permuted_emissions_follow_each_blocks_recorded_permutation(project):
    directory, repo_params = project
    hmm = _cycle_hmm(6)
    _synth_project(directory, repo_params, hmm=hmm, permute_emissions=True, train_shards=2, val_shards=1, seed=5)
    run_synth(load_params("params.yaml"))
    manifest = load_manifest()
    seeds = [seed for shard in manifest.shards for seed in shard.permutation_seeds]
    for shard in manifest.shards:
        split = ("train", "val").index(shard.split)
        assert shard.permutation_seeds == tuple(_seed(5, split, shard.index, 1, block) for block in range(3))
    assert len(set(seeds)) == len(seeds) == 9

    for shard in manifest.shards:
        tokens = np.asarray(manifest.open(shard))
        permutations = set()
        for row in range(shard.sequences):
            perm = manifest.permutation(shard, row)
            permutations.add(tuple(perm))
            first_state = int(np.argsort(perm)[tokens[row, 0]])
            states = (first_state + np.arange(16)) % 6
            np.testing.assert_array_equal(tokens[row], perm[states])  # token = perm[the state's symbol]
            assert np.all(permuted_hmm(hmm, perm).emission.numpy()[states, tokens[row]] == 1)
        assert len(permutations) == 3  # a fresh one per block of 16 sequences (16, 16, 8)


def test_synth_verify_names_a_corrupt_shard_and_load_manifest_a_missing_one(project, capsys):
    directory, repo_params = project
    _synth_project(directory, repo_params)
    params = load_params("params.yaml")
    run_synth(params)
    run_verify(params)
    assert "all 5 shards (3 train, 2 val; 3,200 tokens)" in capsys.readouterr().out

    path = directory / "shards" / "val_00000.bin"
    data = bytearray(path.read_bytes())
    data[7] ^= 0x01
    path.write_bytes(bytes(data))
    done = _labpipe(directory, "synth-verify")
    assert done.returncode == 1
    assert "shard shards/val_00000.bin is corrupt" in done.stderr

    (directory / "shards" / "train_00001.bin").unlink()
    with pytest.raises(ShardError, match="train_00001.bin listed in .* is missing"):
        load_manifest()


def test_bad_checkpoints_are_value_errors_naming_the_problem(project, capsys):
    directory, repo_params = project
    _synth_project(directory, repo_params, hmm_checkpoint="nowhere.pt")
    assert main(["synth"]) == 2
    assert "synth.hmm_checkpoint nowhere.pt does not exist" in capsys.readouterr().err

    ends = HMM.random(3, 4, seed=0)
    ends.transition[1], ends.end[1] = 0.0, 1.0
    _synth_project(directory, repo_params, hmm=ends)
    assert main(["synth"]) == 2
    assert "state 1 always ends" in capsys.readouterr().err

    torch.save({"hmm": {**HMM.random(3, 4, seed=0).state_dict(), "transition": torch.eye(2)}}, "hmm.pt")
    assert main(["synth"]) == 2
    assert "transition: expected shape (3, 3), got (2, 2)" in capsys.readouterr().err
    assert not MANIFEST.exists()

