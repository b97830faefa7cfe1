"""Training checkpoints on disk: atomic, numbered, never deleted by a change of params or code.

A folder of checkpoints belongs to one trajectory, named by its fingerprint in `run.json`. Two storage forms:
  files        <unit>_XXXXXXXX.pt, each the whole resume state (weights, optimizer, RNG, TrainState)
  directories  <unit>_XXXXXXXX/ with the weights as save_pretrained (published: later stages read them as
               revisions) and trainer_state.pt, the rest of the resume state, kept in the newest RESUME_KEPT
               only (at full scale an optimizer copy per revision would be gigabytes nobody reads)
Each is written to a temp name and renamed into place, so it is complete or absent. Checkpoints made with
another fingerprint are moved to superseded/<fingerprint>/ (and moved back when that fingerprint returns);
an unreadable one is moved to unreadable/ and the previous one used. Only `labpipe checkpoints --prune`
deletes what was moved aside.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from labpipe.files import atomic_dir, save_torch, write_json
from labpipe.inputs import load_torch

RUN_RECORD = "run.json"  # the fingerprint of the trajectory and the params that made it
TRAINER_STATE = "trainer_state.pt"  # the resume state inside a directory checkpoint
SUPERSEDED = "superseded"
UNREADABLE = "unreadable"
RESUME_KEPT = 2  # directory checkpoints that keep their resume state: the newest and one to fall back to
_NAME = re.compile(r"^(?P<unit>epoch|step)_(?P<number>\d{8})(?P<suffix>\.pt)?$")


def _say(message: str) -> None:
    print(message, file=sys.stderr)


class Checkpoints:
    """The checkpoints of one training stage in `directory`."""

    def __init__(self, directory: str | Path, unit: str, directories: bool = False, keep: int = 0):
        self.directory, self.unit, self.directories, self.keep = Path(directory), unit, directories, keep

    def path(self, number: int) -> Path:
        return self.directory / f"{self.unit}_{number:08d}{'' if self.directories else '.pt'}"

    def all(self) -> list[Path]:
        """Complete checkpoints, oldest first (temp names of a killed write start with a dot: never listed)."""
        if not self.directory.is_dir():
            return []
        found = []
        for p in self.directory.iterdir():
            match = _NAME.match(p.name)
            if match and match["unit"] == self.unit and (p.is_dir() == self.directories):
                found.append((int(match["number"]), p))
        return [p for _, p in sorted(found)]

    def resumable(self) -> list[Path]:
        return [p for p in self.all() if not self.directories or (p / TRAINER_STATE).is_file()]

    def state_file(self, checkpoint: Path) -> Path:
        """The file that holds checkpoint's resume state."""
        return checkpoint / TRAINER_STATE if self.directories else checkpoint

    # ------------------------------------------------------------------ one trajectory per folder

    def adopt(self, fingerprint: str, record: dict) -> None:
        """Make this folder the home of trajectory `fingerprint`: checkpoints of another are moved aside to
        superseded/<theirs>/ (with one line saying where), and this trajectory's are brought back from there."""
        current = self._recorded_fingerprint()
        if current == fingerprint:
            return
        entries = self.all()
        if entries or current is not None:
            aside = self.directory / SUPERSEDED / (current or "unrecorded")
            aside.mkdir(parents=True, exist_ok=True)
            for entry in [*entries, self.directory / RUN_RECORD]:
                if entry.exists():
                    entry.rename(aside / entry.name)
            if entries:
                _say(f"{len(entries)} checkpoint(s) in {self.directory} were made with other params, data or "
                     f"code: moved to {aside} (labpipe checkpoints --prune deletes them)")
        returning = self.directory / SUPERSEDED / fingerprint
        if returning.is_dir():
            for entry in returning.iterdir():
                entry.rename(self.directory / entry.name)
            returning.rmdir()
            _say(f"checkpoints made earlier with these params, data and code are back from {returning}")
        if self._recorded_fingerprint() != fingerprint:
            write_json(self.directory / RUN_RECORD, {"fingerprint": fingerprint, **record})

    def _recorded_fingerprint(self) -> str | None:
        path = self.directory / RUN_RECORD
        try:
            return json.loads(path.read_text())["fingerprint"]
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError):
            return "unreadable-run-record"

    # ------------------------------------------------------------------ save and load

    def save(self, number: int, state: dict[str, Any], publish: Callable[[Path], None] | None = None) -> Path:
        """Write checkpoint `number`: `state` (torch-saveable), and in the directory form `publish(dir)` writing
        the weights beside it. Then keep the newest `keep` checkpoints (0: all)."""
        path = self.path(number)
        if self.directories:
            with atomic_dir(path) as tmp:
                publish(tmp)
                save_torch(state, tmp / TRAINER_STATE)
            for old in self.resumable()[:-RESUME_KEPT]:
                (old / TRAINER_STATE).unlink()  # its weights stay: a published revision
        else:
            save_torch(state, path)
        if self.keep > 0:
            for old in self.all()[: -self.keep]:
                shutil.rmtree(old) if old.is_dir() else old.unlink()
        return path

    def load_newest(self, fingerprint: str) -> tuple[Path, dict[str, Any]] | None:
        """The newest readable checkpoint of `fingerprint` and its state; one that cannot be read (truncated,
        corrupt, of another fingerprint) is moved to unreadable/ with a warning, and the one before it is tried."""
        for path in reversed(self.resumable()):
            try:
                state = load(self.state_file(path))
                if state.get("fingerprint") != fingerprint:
                    raise ValueError("its fingerprint is not the folder's")
                return path, state
            except Exception as error:  # noqa: BLE001 - any failure to read means: not usable, fall back
                aside = self.directory / UNREADABLE
                aside.mkdir(exist_ok=True)
                path.rename(aside / path.name)
                _say(f"warning: checkpoint {path} is unreadable ({type(error).__name__}: {error}); moved to "
                     f"{aside}, trying the one before")
        return None


def load(path: str | Path) -> dict[str, Any]:
    """A checkpoint's state, loaded safely: tensors (RNG states too) and plain Python records."""
    return load_torch(path, "labpipe checkpoint")


class TorchRNG:
    """torch's global RNG (and CUDA's) as a checkpoint part: state_dict / load_state_dict like a module."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def state_dict(self) -> dict:
        return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if self.cuda else None}

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        if state["cuda"] is not None and self.cuda:
            torch.cuda.set_rng_state_all(state["cuda"])


class GeneratorState:
    """A torch.Generator as a checkpoint part."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def state_dict(self) -> dict:
        return {"state": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["state"])


# ----------------------------------------------------------------------------- labpipe checkpoints


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def main(argv: list[str]) -> int:
    """labpipe checkpoints [STAGE ...] [--prune]: what each training stage keeps, and what was moved aside."""
    from labpipe import registry

    parser = argparse.ArgumentParser(prog="labpipe checkpoints", description=main.__doc__)
    parser.add_argument("stages", nargs="*", help="training stages (default: all)")
    parser.add_argument("--prune", action="store_true", help="delete superseded/ and unreadable/ checkpoints")
    args = parser.parse_args(argv)
    try:
        stages = [registry.stage(name) for name in args.stages] or list(registry.STAGES.values())
    except KeyError as error:
        print(f"labpipe checkpoints: error: {error.args[0]}", file=sys.stderr)
        return 2
    for stage in (s for s in stages if s.training):
        directory = Path(stage.training.out_dir) / "checkpoints"
        store = Checkpoints(directory, stage.training.unit, stage.training.directory_checkpoints)
        current = store.all()
        print(f"{stage.name}: {len(current)} checkpoint(s) in {directory}"
              + (f", newest {current[-1].name}" if current else ""))
        for kind in (SUPERSEDED, UNREADABLE):
            for entry in sorted((directory / kind).glob("*")) if (directory / kind).is_dir() else []:
                print(f"  {kind}/{entry.name}: {_size(entry) / 1e6:.1f} MB")
                if args.prune:
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
                    print("    deleted")
    return 0
