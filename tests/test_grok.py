import copy
import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from conftest import write_params
from labpipe.checkpoint import Checkpoints
from labpipe.config import load_params
from labpipe.grok.models import ResNetMLP, SparseMoE, log2_loss, log2_prediction
from labpipe.grok.features import encode, make_layout
from labpipe.grok.train import SpikeDetector, evaluate, weight_norms
from labpipe.mheight.data import TRAIN, VAL, write_dataset

OUT_DIR = Path("artifacts/grok")


def test_prediction_is_bounded_below_by_one_and_loss_is_squared_log2_error():
    z = torch.tensor([-30.0, -1.0, 0.0, 2.5, 40.0], dtype=torch.float64)
    h_hat = 2.0 ** np.log1p(np.exp(z.numpy()))  # textbook softplus in the log2 domain
    assert np.allclose(log2_prediction(z).numpy(), np.log2(h_hat), rtol=1e-12)
    assert (h_hat >= 1).all() and (log2_prediction(z) >= 0).all()
    target = torch.tensor([0.0, 1.0, 3.0, 5.0, 2.0], dtype=torch.float64)
    assert np.allclose(log2_loss(z, target).numpy(), (target.numpy() - np.log2(h_hat)) ** 2, rtol=1e-12)


def test_moe_routes_to_top_k_experts_and_balances_like_switch():
    torch.manual_seed(0)
    moe = SparseMoE(d_in=5, n_groups=3, width=8, blocks=1, experts=4, top_k=2).double()
    x = torch.randn(6, 5, dtype=torch.float64)
    onehot = torch.eye(3, dtype=torch.float64)[[0, 1, 2, 0, 1, 2]]
    z, aux = moe(x, onehot)
    # By hand: logits of the gate, the two best experts per row, softmax over their two logits.
    logits = (onehot @ moe.gate.weight.T + moe.gate.bias).detach().numpy()
    scores = np.stack([e.score(x).detach().numpy() for e in moe.experts], axis=1)
    expected, routed = [], np.zeros(4)
    for row in range(6):
        best = np.argsort(-logits[row])[:2]
        w = np.exp(logits[row, best] - logits[row, best].max())
        w /= w.sum()
        expected.append((w * scores[row, best]).sum())
        routed[best] += 1
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    balance = 4 * ((routed / (6 * 2)) * probs.mean(0)).sum()
    assert np.allclose(z.detach().numpy(), expected, rtol=1e-10)
    assert aux.item() == pytest.approx(balance, rel=1e-10)
    with pytest.raises(ValueError, match="top_k=5 must be between 1 and experts=4"):
        SparseMoE(5, 3, 8, 1, experts=4, top_k=5)


def test_weight_norms_per_layer_and_total():
    model = ResNetMLP(4, 6, 2)
    norms = weight_norms(model)
    params = dict(model.named_parameters())
    assert norms["weight_norm/inp.weight"] == pytest.approx(np.linalg.norm(params["inp.weight"].detach().numpy()))
    total = math.sqrt(sum(float((p.detach().numpy() ** 2).sum()) for p in model.parameters()))
    assert norms["weight_norm"] == pytest.approx(total, rel=1e-6)
    assert "weight_norm/inp.bias" not in norms  # per layer = weight matrices


def test_spike_detector_flags_the_start_of_each_spike_only():
    detector = SpikeDetector(factor=2.0, window=3)
    losses = [8.0, 4.0, 2.0, 1.0, 1.1, 2.5, 3.0, 1.0, 0.9, 0.8, 0.7, 1.5, 0.5]
    started = [epoch for epoch, loss in enumerate(losses, start=1) if detector.update(loss)]
    # epoch 6: 2.5 > 2 x min(2, 1, 1.1); epoch 7 continues that spike; epoch 12: 1.5 > 2 x 0.7
    assert started == [6, 12]


def _codes(rng, groups, per_group, with_infinite=0):
    """Rows with a learnable synthetic target (the regressor, not the heights, is under test here)."""
    rows = []
    for n, k, m in groups:
        for i in range(per_group):
            P = rng.integers(-100, 101, size=k * (n - k)).astype(float)
            height = math.inf if i < with_infinite else 2.0 ** (1 + m + np.abs(P).mean() / 25)
            rows.append({"n": n, "k": k, "m": m, "P": P, "height": height})
    return pd.DataFrame(rows)


def test_encoding_pads_p_scales_it_and_excludes_infinite_targets():
    frame = _codes(np.random.default_rng(0), [(9, 4, 2), (10, 6, 3)], per_group=3, with_infinite=1)
    layout = make_layout(frame)
    assert layout.groups == ((9, 4, 2), (10, 6, 3)) and (layout.max_k, layout.max_r) == (6, 5)
    split = encode(frame, layout)
    assert split.excluded_infinite == 2 and len(split.log2_h) == 4
    finite = frame[np.isfinite(frame.height)].reset_index(drop=True)
    for row in range(4):
        n, k = finite.n[row], finite.k[row]
        grid = split.x[row, :30].reshape(6, 5).numpy()
        assert np.allclose(grid[:k, : n - k], finite.P[row].reshape(k, n - k) / layout.p_scale)
        assert not grid[k:, :].any() and not grid[:, n - k :].any()
        assert split.x[row, 30:].tolist() == [1.0, 0.0] if n == 9 else [0.0, 1.0]
        assert split.log2_h[row].item() == pytest.approx(math.log2(finite.height[row]), rel=1e-6)


def test_per_group_validation_loss_matches_pandas():
    frame = _codes(np.random.default_rng(1), [(9, 4, 2), (9, 5, 3), (10, 4, 6)], per_group=7)
    layout = make_layout(frame)
    split = encode(frame, layout)
    model = ResNetMLP(layout.dim, 8, 1)
    mean, per_group = evaluate(model, split, len(layout.groups), torch.device("cpu"), batch=5)
    with torch.no_grad():
        losses = log2_loss(model(split.x, None)[0], split.log2_h).numpy()
    by_hand = pd.Series(losses).groupby(split.group.numpy()).mean()
    assert np.allclose(per_group, by_hand.to_numpy(), rtol=1e-6) and mean == pytest.approx(losses.mean(), rel=1e-6)


def make_grok_project(directory: Path, repo_params: dict, **grok) -> None:
    """A project directory with tiny train/val subsamples and params for grok_train (12 epochs by default)."""
    repo_params = copy.deepcopy(repo_params)
    rng = np.random.default_rng(0)
    groups = [(9, 4, 2), (9, 5, 3), (10, 5, 4)]
    train = _codes(rng, groups, per_group=40, with_infinite=2)
    val = _codes(rng, groups, per_group=20)
    cwd = os.getcwd()
    os.chdir(directory)
    try:
        write_dataset(train, TRAIN)
        write_dataset(val, VAL)
    finally:
        os.chdir(cwd)
    repo_params["grok"].update({"width": 16, "blocks": 1, "batch_size": 32, "epochs": 12, "val_every": 3,
                                "checkpoint_every": 4, "device": "cpu", **grok})
    write_params(directory, repo_params)


@pytest.mark.parametrize("model", ["resnet", "moe"])
def test_training_run_writes_outputs_logs_metrics_and_registers_a_champion(project, model):
    from labpipe.grok.train import run_train

    directory, repo_params = project
    make_grok_project(directory, repo_params, model=model)
    run_train(load_params("params.yaml"))

    metrics = json.loads((OUT_DIR / "metrics.json").read_text())
    train_history = pd.read_csv(OUT_DIR / "train_history.csv")
    val_history = pd.read_csv(OUT_DIR / "val_history.csv")
    assert train_history.epoch.tolist() == list(range(1, 13)) and val_history.epoch.tolist() == [3, 6, 9, 12]
    assert metrics["best_val_loss"] == pytest.approx(val_history.val_loss.min())
    assert metrics["best_epoch"] == int(val_history.epoch[val_history.val_loss.idxmin()])
    assert train_history.train_loss.iloc[-1] < train_history.train_loss.iloc[0]  # it learns
    assert set(metrics["val_loss_per_group"]) == {"n9_k4_m2", "n9_k5_m3", "n10_k5_m4"}
    assert (OUT_DIR / "plots" / "loss.png").stat().st_size > 0 and (OUT_DIR / "plots" / "norms.png").exists()
    assert [p.name for p in Checkpoints(OUT_DIR / "checkpoints", "epoch").all()] == [
        "epoch_00000004.pt", "epoch_00000008.pt", "epoch_00000012.pt"]

    client = MlflowClient()
    champion = client.get_model_version_by_alias("mheight-regressor", "champion")
    run = client.get_run(champion.run_id)
    assert run.data.params["grok.weight_decay"] == "0.01" and run.data.tags["labpipe.stage"] == "grok_train"
    assert run.data.metrics["excluded_infinite_train"] == 6  # 2 per group, left out and counted
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 12
    assert len(client.get_metric_history(run.info.run_id, "val_loss/n9_k4_m2")) == 4
    assert float(champion.tags["metric.val_loss"]) == pytest.approx(metrics["best_val_loss"])
    saved = torch.load(OUT_DIR / "model.pt", weights_only=False)
    assert saved["epoch"] == metrics["best_epoch"]


@pytest.mark.gpu
def test_the_device_resident_gpu_path_matches_the_cpu_path(project):
    """Same seed, same data: CUDA and CPU training end at nearly the same loss (not bit-equal: other kernels)."""
    from labpipe.grok.train import run_train

    directory, repo_params = project
    make_grok_project(directory, repo_params, epochs=6, val_every=3)
    results = {}
    for device in ("cpu", "cuda"):
        run_train(load_params("params.yaml", [f"grok.device={device}"]))
        results[device] = json.loads((OUT_DIR / "metrics.json").read_text())["final_train_loss"]
    assert results["cuda"] == pytest.approx(results["cpu"], rel=1e-3)


def _entered_weights(overrides: list[str]) -> tuple[torch.nn.Module, str]:
    """The model as a new grok_train run starts it (the driver loads init_from / init_experts_from), and the
    MLflow run id; no epoch is trained."""
    from labpipe.grok.models import build_model
    from labpipe.grok.train import init_weights
    from labpipe.run import TrainingRun

    params = load_params("params.yaml", overrides)
    layout = make_layout(pd.read_parquet(TRAIN))
    model = build_model(params.grok, layout.dim, len(layout.groups))
    with TrainingRun("grok_train", params, [TRAIN, VAL], {"model": model},
                     init=lambda loaded: init_weights(model, params.grok, loaded)) as run:
        return model, run.state.run_id


def test_a_moe_starts_from_pretrained_resnet_experts_exactly(project):
    from labpipe.grok.train import run_train

    directory, repo_params = project
    make_grok_project(directory, repo_params, epochs=3, val_every=3, checkpoint_every=3)
    experts = []
    for seed in (0, 1):
        run_train(load_params("params.yaml", [f"grok.seed={seed}"]))
        experts.append(directory / f"expert_{seed}.pt")
        experts[-1].write_bytes((OUT_DIR / "model.pt").read_bytes())
    moe, run_id = _entered_weights(["grok.model=moe", "grok.experts=2", "grok.top_k=2",
                                    f"grok.init_experts_from={json.dumps([str(p) for p in experts])}"])
    for expert, path in zip(moe.experts, experts, strict=True):
        saved = torch.load(path, weights_only=False)["model"]
        assert all(torch.equal(saved[name], tensor) for name, tensor in expert.state_dict().items())
    assert MlflowClient().get_run(run_id).data.tags["labpipe.init_from"] == ", ".join(map(str, experts))


def test_fine_tuning_starts_from_the_registered_champion_and_a_bad_source_is_one_line(project):
    from labpipe.errors import InputError
    from labpipe.grok.train import run_train

    directory, repo_params = project
    make_grok_project(directory, repo_params, epochs=3, val_every=3, checkpoint_every=3)
    run_train(load_params("params.yaml"))
    champion = torch.load(OUT_DIR / "model.pt", weights_only=False)["model"]  # the registered best weights
    model, _ = _entered_weights(["grok.init_from=models:/mheight-regressor@champion", "grok.lr=0.01"])
    assert all(torch.equal(champion[name], tensor) for name, tensor in model.state_dict().items())
    with pytest.raises(InputError, match=r"grok.init_from=missing.pt: cannot load weights"):
        _entered_weights(["grok.init_from=missing.pt"])
    with pytest.raises(InputError, match=r"lies in artifacts/grok, which this run writes"):
        _entered_weights([f"grok.init_from={OUT_DIR / 'model.pt'}"])
    (directory / "best.pt").write_bytes((OUT_DIR / "model.pt").read_bytes())
    with pytest.raises(InputError, match=r"grok.init_from=best.pt: the weights do not fit the model"):
        _entered_weights(["grok.init_from=best.pt", "grok.width=8"])
