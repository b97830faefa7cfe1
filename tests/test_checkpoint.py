import os

import pytest
import torch

from labpipe.checkpoint import Checkpoints
from labpipe.files import atomic_dir, atomic_path, save_torch, write_json


def test_checkpoints_are_ordered_by_number_and_the_newest_keep_are_kept(tmp_path):
    store = Checkpoints(tmp_path, "epoch", keep=2)
    for epoch in (2, 10, 9):
        store.save(epoch, {"epoch": epoch, "fingerprint": "f"})
    assert [p.name for p in store.all()] == ["epoch_00000009.pt", "epoch_00000010.pt"]
    assert store.load_newest("f")[1]["epoch"] == 10
    assert Checkpoints(tmp_path / "missing", "epoch").all() == []


def test_round_trip_keeps_tensors_and_rng_state(tmp_path):
    generator = torch.Generator().manual_seed(3)
    state = {"w": torch.randn(3, 2), "rng": generator.get_state(), "history": [{"loss": 0.5}], "fingerprint": "f"}
    Checkpoints(tmp_path, "step").save(1, state)
    restored = Checkpoints(tmp_path, "step").load_newest("f")[1]
    assert torch.equal(restored["w"], state["w"]) and restored["history"] == state["history"]
    resumed = torch.Generator()
    resumed.set_state(restored["rng"])
    assert torch.equal(torch.randperm(10, generator=resumed), torch.randperm(10, generator=generator))


def test_equal_weights_make_equal_files_whatever_the_temp_name(tmp_path):
    state = {"w": torch.arange(6.0).reshape(2, 3)}
    save_torch(state, tmp_path / "a.pt")
    save_torch(state, tmp_path / "other_name.pt")
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "other_name.pt").read_bytes()


def test_another_fingerprint_moves_checkpoints_aside_and_back(tmp_path, capsys):
    store = Checkpoints(tmp_path, "epoch")
    store.adopt("one", {})
    store.save(1, {"fingerprint": "one"})
    before = (tmp_path / "epoch_00000001.pt").read_bytes()
    store.adopt("two", {})
    assert store.all() == [] and (tmp_path / "superseded/one/epoch_00000001.pt").read_bytes() == before
    assert "moved to" in capsys.readouterr().err
    store.save(1, {"fingerprint": "two"})
    store.adopt("one", {})  # the first trajectory is back, the second aside
    assert store.load_newest("one")[1]["fingerprint"] == "one"
    assert (tmp_path / "superseded/two/epoch_00000001.pt").exists() and not (tmp_path / "superseded/one").exists()


def test_an_unreadable_newest_checkpoint_is_moved_aside_and_the_previous_used(tmp_path, capsys):
    store = Checkpoints(tmp_path, "epoch")
    store.save(1, {"fingerprint": "f", "n": 1})
    store.save(2, {"fingerprint": "f", "n": 2})
    (tmp_path / "epoch_00000002.pt").write_bytes(b"\x00garbage")
    path, state = store.load_newest("f")
    assert path.name == "epoch_00000001.pt" and state["n"] == 1
    assert (tmp_path / "unreadable/epoch_00000002.pt").exists() and "epoch_00000002.pt is unreadable" in \
        capsys.readouterr().err


def test_directory_checkpoints_keep_the_resume_state_in_the_newest_two_only(tmp_path):
    store = Checkpoints(tmp_path, "step", directories=True)
    for step in (1, 2, 3):
        store.save(step, {"fingerprint": "f"}, publish=lambda d: (d / "config.json").write_text("{}"))
    assert [p.name for p in store.all()] == ["step_00000001", "step_00000002", "step_00000003"]
    assert [p.name for p in store.resumable()] == ["step_00000002", "step_00000003"]
    assert all((p / "config.json").exists() for p in store.all())  # the published weights stay


def test_a_failed_write_leaves_the_previous_file_and_no_debris(tmp_path):
    target = tmp_path / "metrics.json"
    write_json(target, {"loss": 1.0})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("{half a fi")
        raise RuntimeError("killed mid-write")
    assert target.read_text().strip().startswith("{") and '"loss": 1.0' in target.read_text()
    assert os.listdir(tmp_path) == ["metrics.json"]


def test_temp_files_of_a_killed_write_are_not_checkpoints(tmp_path):
    Checkpoints(tmp_path, "epoch").save(1, {"epoch": 1})
    (tmp_path / ".epoch_00000002.pt.abc.tmp").write_bytes(b"partial")
    assert [p.name for p in Checkpoints(tmp_path, "epoch").all()] == ["epoch_00000001.pt"]


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
