import os

import pytest
import torch

from labpipe import checkpoint
from labpipe.files import atomic_dir, atomic_path, write_json


def test_latest_orders_by_number_not_by_text(tmp_path):
    for epoch in (2, 10, 9):
        checkpoint.save(tmp_path, epoch, {"epoch": epoch})
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == [
        "epoch_00000002.pt", "epoch_00000009.pt", "epoch_00000010.pt"]
    assert checkpoint.load(checkpoint.latest(tmp_path))["epoch"] == 10
    assert checkpoint.latest(tmp_path / "missing") is None


def test_round_trip_keeps_tensors_and_rng_state(tmp_path):
    generator = torch.Generator().manual_seed(3)
    state = {"w": torch.randn(3, 2), "rng": generator.get_state(), "history": [{"loss": 0.5}]}
    restored = checkpoint.load(checkpoint.save(tmp_path, 1, state))
    assert torch.equal(restored["w"], state["w"]) and restored["history"] == state["history"]
    resumed = torch.Generator()
    resumed.set_state(restored["rng"])
    assert torch.equal(torch.randperm(10, generator=resumed), torch.randperm(10, generator=generator))


def test_keep_prunes_the_oldest(tmp_path):
    for epoch in range(1, 6):
        checkpoint.save(tmp_path, epoch, {"epoch": epoch}, keep=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["epoch_00000004.pt", "epoch_00000005.pt"]


def test_a_failed_write_leaves_the_previous_file_and_no_debris(tmp_path):
    target = tmp_path / "metrics.json"
    write_json(target, {"loss": 1.0})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("{half a fi")
        raise RuntimeError("killed mid-write")
    assert target.read_text().strip().startswith("{") and '"loss": 1.0' in target.read_text()
    assert os.listdir(tmp_path) == ["metrics.json"]


def test_temp_files_of_a_killed_write_are_not_checkpoints(tmp_path):
    checkpoint.save(tmp_path, 1, {"epoch": 1})
    (tmp_path / ".epoch_00000002.pt.abc.tmp").write_bytes(b"partial")
    assert checkpoint.latest(tmp_path).name == "epoch_00000001.pt"


def test_atomic_dir_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "step_00000010"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "config.json").write_text("{}")
            raise RuntimeError("killed while writing")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with atomic_dir(target) as tmp:
        (tmp / "config.json").write_text('{"a": 1}')
    with atomic_dir(target) as tmp:  # replaces a previous version whole
        (tmp / "model.safetensors").write_bytes(b"x")
    assert sorted(p.name for p in target.iterdir()) == ["model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000010"]


def test_atomic_outputs_get_the_usual_permissions_not_mkstemps_0600(tmp_path):
    previous = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {})
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "f").write_text("x")
    finally:
        os.umask(previous)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755
