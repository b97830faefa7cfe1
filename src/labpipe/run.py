"""The run lifecycle of every training stage: one driver, so that a trainer is its model, data and loop.

    with TrainingRun("grok_train", params, inputs=[TRAIN, VAL], parts={"model": model, ...}) as run:
        for epoch in run.steps():             # from the newest checkpoint on; checkpoints on the cadence
            ...                                 # the stage's loop body
            run.log(metrics, epoch); run.offer_best(val_loss, model)
        with run.outputs() as out:            # staged, moved into place only when the block succeeds
            write_outputs(out, run.state)
        run.finish(best_model, final_metrics)   # artifacts, the model, the champion rule of the registry

What the driver does, in this order, before anything on disk changes and after every param was checked:
  1. loads `<section>.init_from` (a file, a save_pretrained directory or an MLflow model URI) when given;
  2. fingerprints the trajectory: the section's params except those that do not change it (registry
     NOT_TRAJECTORY and the run length where the schedule allows extending), the exact input files, the
     code of the stage's import closure (closure.py) and the init weights;
then takes the lock of the output folder (lock.py), adopts the checkpoint folder for this fingerprint (others
are moved aside, never deleted: checkpoint.py), resumes from the newest readable checkpoint, and opens the
stage's MLflow run, the same run again on resume. Raising the run length of a finished run continues it:
`for step in run.steps()` picks up after the last step done, and the result equals an uninterrupted run.
An evaluation made only because the run ends (off the trainer's cadence) goes after the loop: the last
checkpoint is saved before it, so a rerun makes it again and an extension never sees it. A run length below
the steps already done is refused: its outputs would be those of the longer run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from labpipe import closure, distributed, registry
from labpipe.checkpoint import Checkpoints, GeneratorState, load
from labpipe.config import Params, flatten
from labpipe.errors import InputError, UserError
from labpipe.files import sha256_file, staged_outputs
from labpipe.inputs import from_pretrained, is_model_uri, load_torch, reason
from labpipe.lock import output_lock

FORMAT = 2  # of the checkpoint payload


class DivergedError(UserError):
    """The tracked metric became NaN or inf: nothing is written, the good checkpoints stay."""

    exit_code = 1


@dataclasses.dataclass
class Best:
    step: int
    value: float
    weights: dict[str, torch.Tensor]


@dataclasses.dataclass
class TrainState:
    """What a run has done so far, saved in every checkpoint with the stage's parts."""

    step: int = 0  # epochs or steps completed
    run_id: str | None = None  # the MLflow run, reopened on resume
    history: list[dict] = dataclasses.field(default_factory=list)  # the stage's records, one per logged step
    best: Best | None = None  # best-so-far by the champion metric: what the stage publishes and registers
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # the stage's own records

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(dataclasses.replace(self, best=None)),
                "best": None if self.best is None else vars(self.best)}

    @classmethod
    def from_dict(cls, saved: dict) -> TrainState:
        best = saved.get("best")
        return cls(**{**saved, "best": None if best is None else Best(**best)})


# ----------------------------------------------------------------------------- weights from elsewhere


def load_weights(source: str, key: str) -> dict[str, torch.Tensor]:
    """The state dict that `source` holds: an MLflow model URI (models:/name@alias, runs:/id/model), a
    save_pretrained directory, a stage output or checkpoint .pt of labpipe, or a bare state dict file.
    InputError naming `key` and the source when it holds none."""
    try:
        if is_model_uri(source):
            from labpipe.tracking import load_logged_model

            return load_logged_model(source).state_dict()
        path = Path(source)
        if (path / "config.json").is_file():
            from transformers import AutoModelForCausalLM

            return from_pretrained(AutoModelForCausalLM, path, "causal LM").state_dict()
        if path.is_dir() and (path / "trainer_state.pt").is_file():
            raise InputError("a directory checkpoint without config.json")
        saved = load_torch(path, "model file")
    except InputError as error:
        raise InputError(f"{key}={source}: cannot load weights ({error})") from None
    except Exception as error:  # noqa: BLE001 - whatever the reason, the user's source is not usable
        raise InputError(f"{key}={source}: cannot load weights ({reason(error)})") from None
    if isinstance(saved, dict):
        for nested in (("parts", "model"), ("model",), ("hmm",)):  # a checkpoint, a stage's model.pt, an HMM
            found = saved
            for name in nested:
                found = found.get(name) if isinstance(found, dict) else None
            if isinstance(found, dict) and found and all(isinstance(v, torch.Tensor) for v in found.values()):
                return found
        if saved and all(isinstance(v, torch.Tensor) for v in saved.values()):
            return saved
    raise InputError(f"{key}={source}: no model weights in it (a labpipe model.pt, checkpoint or state dict)")


def load_into(module: torch.nn.Module, weights: Mapping[str, torch.Tensor], what: str) -> None:
    """module.load_state_dict(weights), an InputError naming `what` when they do not fit."""
    try:
        module.load_state_dict(weights)
    except RuntimeError as error:
        first = str(error).strip().splitlines()
        raise InputError(f"{what}: the weights do not fit the model ({' '.join(first[:2])[:400]})") from None


def weights_digest(weights: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(weights[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _cpu_copy(weights: torch.nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = weights.state_dict() if isinstance(weights, torch.nn.Module) else weights
    return {name: tensor.detach().cpu().clone() for name, tensor in state.items()}


def _part_state(part: Any) -> dict:
    return GeneratorState(part).state_dict() if isinstance(part, torch.Generator) else part.state_dict()


def _load_part(part: Any, state: dict) -> None:
    (GeneratorState(part) if isinstance(part, torch.Generator) else part).load_state_dict(state)


# ----------------------------------------------------------------------------- the driver


class TrainingRun(contextlib.AbstractContextManager):
    """One training run of a registered stage (see the module docstring)."""

    def __init__(self, stage: str, params: Params, inputs: list[str | Path], parts: dict[str, Any],
                 init: Callable[[list[dict[str, torch.Tensor]]], None] | None = None,
                 world: distributed.World = distributed.SINGLE):
        self.stage = registry.stage(stage)
        self.spec = self.stage.training
        self.params = params
        self.section = getattr(params, self.spec.section)
        self.out_dir = Path(self.spec.out_dir)
        self.parts = parts
        self._inputs = [Path(p) for p in inputs]
        self.length = getattr(self.section, self.spec.length)
        self.state = TrainState()
        self.resumed = False
        self.world = world
        self.main = world.main  # rank 0: the one that writes
        self._init = init or (lambda loaded: load_into(parts["model"], loaded[0], self._init_sources()[0][0]))
        self.published: list[Path] = []  # what outputs() put in place
        self.stop_reason: str | None = None  # stop(): why the run ended before its length
        self._exit = contextlib.ExitStack()
        self._tracker = None

    # ------------------------------------------------------------------ opening

    def _init_sources(self) -> list[tuple[str, str]]:
        """(param key, source) of every set init param: init_from, then each of init_experts_from."""
        s, init_from = self.spec.section, getattr(self.section, "init_from", "")
        experts = getattr(self.section, "init_experts_from", ())
        return ([(f"{s}.init_from", init_from)] if init_from else []) + [
            (f"{s}.init_experts_from[{i}]", source) for i, source in enumerate(experts)]

    def trajectory_params(self) -> dict[str, Any]:
        """The section's params that shape the trajectory: what the fingerprint holds. The params whose product
        is a step's batch (registry Training.step_batch) count by that product alone: splitting it otherwise
        over passes or ranks gives the same steps."""
        free = set(registry.NOT_TRAJECTORY) | set(self.spec.also_not_trajectory) | set(self.spec.step_batch)
        if self.spec.extendable:
            free.add(self.spec.length)
        trajectory = {k: v for k, v in flatten(self.section).items() if k not in free}
        if self.spec.step_batch:
            trajectory["step_batch"] = math.prod(getattr(self.section, key) for key in self.spec.step_batch)
        return trajectory

    def fingerprint(self, inputs: list[str | Path], init_digests: list[str]) -> str:
        digest = hashlib.sha256(json.dumps(self.trajectory_params(), sort_keys=True).encode())
        for path in inputs:
            digest.update(sha256_file(path).encode())
        digest.update(closure.code_digest(closure.import_closure(self.stage.module), closure.ROOT.parent).encode())
        for init in init_digests:
            digest.update(init.encode())
        return digest.hexdigest()[:16]

    def __enter__(self) -> TrainingRun:
        from labpipe.tracking import stage_run

        try:
            init = self._init_sources()
            for key, source in init:
                if Path(source).resolve().is_relative_to(self.out_dir.resolve()):  # would change under the run
                    raise InputError(f"{key}={source} lies in {self.out_dir}, which this run writes: copy those "
                                     "weights elsewhere first")
            loaded = [load_weights(source, key) for key, source in init]
            self.fingerprint_ = self.fingerprint(self._inputs, [weights_digest(w) for w in loaded])
            distributed.agree(self.world, self.fingerprint_, "fingerprint (params, inputs, code, init weights)")
            if loaded:  # before anything on disk changes: weights that do not fit stop here (a resume overwrites)
                self._init(loaded)
            self.checkpoints = Checkpoints(self.out_dir / "checkpoints", self.spec.unit,
                                           self.spec.directory_checkpoints, self.section.keep_checkpoints)
            newest = distributed.from_main(self.world, self._adopt_checkpoints)  # every rank resumes from it
            if newest is not None:
                self._restore(newest, self._newest_state if self.main else load(self.checkpoints.state_file(newest)))
            if self.main:
                self._tracker = self._exit.enter_context(stage_run(
                    self.params.tracking, self.stage.name,
                    flatten(self.section, f"{self.spec.section}."), self.state.run_id))
                self._tag_run([source for _key, source in init])
        except BaseException:
            self._exit.close()
            raise
        return self

    def _adopt_checkpoints(self) -> Path | None:
        """Rank 0: lock the output folder, adopt the checkpoint folder for this fingerprint, and return the
        newest readable checkpoint (None: a fresh start); its state is kept in self._newest_state."""
        self._exit.enter_context(output_lock(self.out_dir, self.stage.name))
        record = {"stage": self.stage.name, "params": self.trajectory_params(),
                  "inputs": [str(p) for p in self._inputs]}
        self.checkpoints.adopt(self.fingerprint_, record)
        found = self.checkpoints.load_newest(self.fingerprint_)
        if found is None:
            return None
        done = found[1]["state"]["step"]
        if done > self.length:  # its outputs would be those of the longer run
            raise UserError(f"{self.spec.section}.{self.spec.length}={self.length}: this run has done {done} "
                            f"{self.spec.unit}s already ({found[0]}); give at least {done}, or move "
                            f"{self.checkpoints.directory} aside to start over")
        path, self._newest_state = found
        return path

    def __exit__(self, *exc) -> bool:
        return self._exit.__exit__(*exc)  # the exception reaches the MLflow run (FAILED, KILLED) and the lock

    def _restore(self, path: Path, saved: dict) -> None:
        self.state = TrainState.from_dict(saved["state"])
        for name, part in self.parts.items():
            if name in saved["parts"]:
                _load_part(part, saved["parts"][name])
        if self.spec.directory_checkpoints:  # the weights are the published save_pretrained files
            model = self.parts["model"]
            model.load_state_dict(type(model).from_pretrained(path).state_dict())
        self.resumed = True
        if self.main:
            print(f"resuming from {path} ({self.spec.unit} {self.state.step})")

    def _tag_run(self, sources: list[str]) -> None:
        from mlflow import MlflowClient

        self.state.run_id = self._tracker.run_id
        tags = {"labpipe.fingerprint": self.fingerprint_}
        if sources:
            tags["labpipe.init_from"] = ", ".join(sources)
        if self.resumed:  # params are immutable in MLflow: what changed since the run was opened goes in tags
            logged = MlflowClient().get_run(self.state.run_id).data.params
            for key, value in flatten(self.section, f"{self.spec.section}.").items():
                if key in logged and logged[key] != str(value):
                    tags[f"labpipe.changed.{key}"] = f"{logged[key]} -> {value}"
        self._tracker.set_tags(tags)

    # ------------------------------------------------------------------ the loop

    def steps(self, desc: str | None = None) -> Iterator[int]:
        """The epochs (or steps) still to do, 1-based; after each, a checkpoint on the cadence and at the end
        (rank 0's: the other ranks hold the same state)."""
        every = self.section.checkpoint_every
        bar = tqdm(total=self.length, initial=self.state.step, desc=desc or self.stage.name, unit=self.spec.unit,
                   disable=not self.main)
        self.bar = bar
        try:
            for number in range(self.state.step + 1, self.length + 1):
                if self.stop_reason:
                    break
                yield number
                self.state.step = number
                bar.update()
                if self.main and (number % every == 0 or number == self.length or self.stop_reason):
                    self.save_checkpoint()
        finally:
            bar.close()
        self.set_tags({"stop_reason": self.stop_reason or f"{self.spec.section}.{self.spec.length}",
                       f"{self.spec.unit}s_run": self.state.step})

    def stop(self, reason: str) -> None:
        """End the run after the current step (before the first one, when called before the loop): the trainer's
        own stopping rule, which it evaluates on its records, so that a resumed run stops at the same step."""
        self.stop_reason = reason

    def save_checkpoint(self) -> Path:
        parts = {name: _part_state(part) for name, part in self.parts.items()
                 if not (self.spec.directory_checkpoints and name == "model")}
        payload = {"format": FORMAT, "fingerprint": self.fingerprint_, "state": self.state.to_dict(), "parts": parts}
        publish = self.parts["model"].save_pretrained if self.spec.directory_checkpoints else None
        return self.checkpoints.save(self.state.step, payload, publish)

    def log(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self.main:
            self._tracker.log_metrics(metrics, step=self.state.step if step is None else step)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self.main:
            self._tracker.set_tags(tags)

    def offer_best(self, value: float, weights: torch.nn.Module | Mapping[str, torch.Tensor], step: int) -> bool:
        """Keep `weights` as the best so far when `value` of the champion metric beats it (rank 0 keeps the
        weights; the others only the record); a NaN or inf stops the run (DivergedError) before any output is
        written."""
        metric = self.spec.champion.metric
        if not math.isfinite(value):
            raise DivergedError(f"{self.stage.name}: {metric} is {value} at {self.spec.unit} {step}: training "
                                f"diverged; outputs left as they were, the checkpoints before it kept")
        best = self.state.best
        lower = self.spec.champion.lower_is_better
        if best is None or (value < best.value if lower else value > best.value):
            self.state.best = Best(step, float(value), _cpu_copy(weights) if self.main else {})
            return True
        return False

    # ------------------------------------------------------------------ the end

    def outputs(self) -> contextlib.AbstractContextManager[Path]:
        """A staging folder mirroring the output folder (files.staged_outputs): what the block writes there
        replaces the outputs only when the whole block succeeds."""
        return staged_outputs(self.out_dir, self.published)

    def finish(self, model: torch.nn.Module, metrics: Mapping[str, Any]) -> None:
        """Log what outputs() published (its PNG and JSON files as artifacts), log `model` (the best weights),
        apply the champion rule of the registry, and say in one line what became of it. Rank 0's alone, as
        outputs()."""
        from labpipe.tracking import register_if_better

        tracker, champion, best = self._tracker, self.spec.champion, self.state.best
        for path in self.published:
            if path.suffix in (".png", ".json"):
                relative = path.parent.relative_to(self.out_dir)
                tracker.log_artifact(path, None if relative == Path() else str(relative))
        tracker.log_outputs(self.published)
        flat = flatten(self.params)
        name = re.sub(r"\{([\w.]+)\}", lambda m: str(flat[m[1]]), champion.model)
        uri = tracker.log_torch_model(model.cpu())
        candidate = True
        if champion.band is not None:
            metric, low, high = champion.band
            candidate = flat[low] <= metrics[metric] <= flat[high]
        version = register_if_better(uri, name, champion.metric, best.value, champion.lower_is_better,
                                     champion.revision) if candidate else None
        tracker.set_tags({"champion": version is not None})
        print(f"best {champion.metric} {best.value:.4f} at {self.spec.unit} {best.step}; "
              + (f"registered {name} v{version.version} as champion" if version else
                 "the current champion stays" if candidate else
                 f"{champion.band[0]}={metrics[champion.band[0]]:.3g} outside [{flat[champion.band[1]]}, "
                 f"{flat[champion.band[2]]}]: not a champion candidate"))
