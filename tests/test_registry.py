"""The registry of research lines is the one list: dvc.yaml, the CLI, Params and the fingerprint agree with it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from labpipe import cli, closure, config, registry

REPO = Path(__file__).resolve().parents[1]
DVC_STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def _code_deps(spec: dict) -> list[Path]:
    return [REPO / dep for dep in spec.get("deps", []) if str(dep).startswith("src/")]


def test_every_dvc_stage_is_a_registered_stage_running_its_verb():
    assert set(DVC_STAGES) == set(registry.STAGES)
    for name, spec in DVC_STAGES.items():
        assert spec["cmd"].split()[:2] == ["labpipe", registry.STAGES[name].verb], name


@pytest.mark.parametrize("name", sorted(registry.STAGES))
def test_the_code_deps_of_each_stage_cover_the_import_closure_of_its_entry_module(name):
    """What DVC reruns a stage for is what the stage runs: every labpipe file its entry module can import."""
    deps = _code_deps(DVC_STAGES[name])
    uncovered = [path for path in closure.import_closure(registry.STAGES[name].module)
                 if not any(path == dep or dep in path.parents for dep in deps)]
    assert not uncovered, f"{name}: add to its dvc.yaml deps: " + ", ".join(str(p.relative_to(REPO)) for p in uncovered)


def test_the_resume_fingerprint_hashes_the_code_of_the_same_closure(tmp_path):
    """TrainingRun.fingerprint digests closure.import_closure(entry module): a file of it changes the digest,
    a docstring or a comment does not."""
    files = closure.import_closure(registry.STAGES["grok_train"].module)
    copies = []
    for path in files:
        copy = tmp_path / path.relative_to(closure.ROOT.parent)
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_text(path.read_text())
        copies.append(copy)
    base = closure.code_digest(copies, tmp_path)
    models = next(p for p in copies if p.name == "models.py")
    models.write_text(models.read_text().replace('"""Regressors of log2', '# a comment\n"""Regressors, of log2'))
    assert closure.code_digest(copies, tmp_path) == base
    models.write_text(models.read_text().replace("nn.LayerNorm(width)", "nn.LayerNorm(width, eps=1e-6)", 1))
    assert closure.code_digest(copies, tmp_path) != base


def test_verbs_and_params_come_from_the_registry():
    for stage in registry.STAGES.values():
        assert cli.STAGES[stage.verb][0] == stage.entry
        assert all(section in [f.name for f in dataclasses.fields(config.Params)] for section in stage.reads)
    sections = [name for line in registry.LINES for name in line.sections]
    assert [f.name for f in dataclasses.fields(config.Params)] == ["tracking", *sections]
    for stage in registry.STAGES.values():
        if stage.training:
            fields = {f.name for f in dataclasses.fields(config._field_types(config.Params)[stage.training.section])}
            assert {stage.training.length, "checkpoint_every", "keep_checkpoints", "init_from"} <= fields
