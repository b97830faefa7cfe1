import copy
import dataclasses
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
from labpipe.grok.features import encode, make_layout
from labpipe.grok.models import ResNetMLP, build_model
from labpipe.grok.train import evaluate, weight_norms
from labpipe.mheight.data import TEST, TRAIN, VAL, write_dataset

OUT_DIR = Path("artifacts/grok")


def test_weight_norms_per_layer_and_total():
    model = ResNetMLP(4, 6, 2)
    norms = weight_norms(model)
    params = dict(model.named_parameters())
    assert norms["weight_norm/inp.weight"] == pytest.approx(np.linalg.norm(params["inp.weight"].detach().numpy()))
    total = math.sqrt(sum(float((p.detach().numpy() ** 2).sum()) for p in model.parameters()))
    assert norms["weight_norm"] == pytest.approx(total, rel=1e-6)
    assert "weight_norm/inp.bias" not in norms  # per layer = weight matrices


def _codes(rng, groups, per_group, with_infinite=0, split=""):
    """Rows with a learnable synthetic target and a lower bound below it (the regressor, not the heights, is
    under test here)."""
    rows = []
    for n, k, m in groups:
        for i in range(per_group):
            P = rng.integers(-100, 101, size=k * (n - k)).astype(float)
            height = math.inf if i < with_infinite else 2.0 ** (1 + m + np.abs(P).mean() / 25)
            bound = max(1.0, min(height, 2.0 ** (1 + m + np.abs(P).mean() / 25)) / 2 ** rng.uniform(0, 3))
            rows.append({"n": n, "k": k, "m": m, "P": P, "height": height, "split": split, "bound": bound})
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
    model = build_model(load_params(Path(__file__).parents[1] / "params.yaml").grok, layout)
    result = evaluate(model, split, len(layout.groups), torch.device("cpu"), batch=5)
    with torch.no_grad():
        z = model(split.x)[0]
    log2_hat = np.logaddexp(0, z.double().numpy())  # labpipe's head: log2 h_hat = softplus(z)
    losses = (split.log2_h.numpy() - log2_hat) ** 2
    by_hand = pd.DataFrame({"loss": losses, "group": split.group.numpy(),
                            "below": log2_hat < np.log2(frame.bound.to_numpy())})
    assert np.allclose(result.per_group, by_hand.groupby("group").loss.mean(), rtol=1e-5)
    assert result.loss == pytest.approx(losses.mean(), rel=1e-5)
    assert np.allclose(result.below_bound_per_group, by_hand.groupby("group").below.mean())
    assert result.below_bound == pytest.approx(by_hand.below.mean())


def make_grok_project(directory: Path, repo_params: dict, **grok) -> None:
    """A project directory with tiny train/val subsamples and params for grok_train (12 epochs by default)."""
    repo_params = copy.deepcopy(repo_params)
    rng = np.random.default_rng(0)
    groups = [(9, 4, 2), (9, 5, 3), (10, 5, 4)]
    train = _codes(rng, groups, per_group=40, with_infinite=2, split="train")
    val = _codes(rng, groups, per_group=20, split="val")
    test = _codes(rng, groups, per_group=20, split="test")
    cwd = os.getcwd()
    os.chdir(directory)
    try:
        write_dataset(train, TRAIN)
        write_dataset(val, VAL)
        write_dataset(test, TEST)
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
    layers = [c for c in train_history.columns if c.startswith("weight_norm/")]
    assert "weight_norm/blocks.0.fc1.weight" in layers or "weight_norm/experts.0.blocks.0.fc1.weight" in layers

    # The best weights, evaluated here by hand: val and test log2-MSE overall and per group, below-bound shares.
    best = build_model(load_params("params.yaml").grok, make_layout(pd.read_parquet(TRAIN)))
    best.load_state_dict(saved["model"])
    for name, path in (("val", VAL), ("test", TEST)):
        frame = pd.read_parquet(path)
        frame = frame[np.isfinite(frame.height)]
        with torch.no_grad():
            z = best(encode(frame, best.layout).x)[0].double().numpy()
        # labpipe's head: log2 h_hat = softplus(z) = log(1 + e^z)
        groups = zip(frame.n, frame.k, frame.m, strict=True)
        by_hand = pd.DataFrame({"group": [f"n{n}_k{k}_m{m}" for n, k, m in groups],
                                "loss": (np.log2(frame.height.to_numpy()) - np.logaddexp(0, z)) ** 2,
                                "below": np.logaddexp(0, z) < np.log2(frame.bound.to_numpy())})
        overall = metrics["best_val_loss"] if name == "val" else metrics["test_loss"]
        per_group = metrics["best_val_loss_per_group"] if name == "val" else metrics["test_loss_per_group"]
        assert overall == pytest.approx(by_hand.loss.mean(), rel=1e-5)
        assert per_group == pytest.approx(by_hand.groupby("group").loss.mean().to_dict(), rel=1e-5)
    assert metrics["test_below_bound"] == pytest.approx(by_hand.below.mean())
    assert run.data.metrics["test_loss"] == pytest.approx(metrics["test_loss"])
    assert run.data.tags["stop_reason"] == metrics["stop_reason"] == "grok.epochs" and metrics["epochs_run"] == 12
    assert run.data.tags["grokking_epoch"] == "none" and metrics["grokking"] is None  # 4 validations: too few


def test_an_epoch_minimises_the_log2_error_plus_the_violation_penalty():
    """One batch, one AdamW step of train_epoch against the same step on the loss written out here."""
    from labpipe.grok.train import train_epoch

    frame = _codes(np.random.default_rng(2), [(9, 4, 2), (10, 5, 3)], per_group=8, split="train")
    layout = make_layout(frame)
    split = encode(frame, layout)
    g = dataclasses.replace(load_params(Path(__file__).parents[1] / "params.yaml").grok,
                            violation_coef=3.0, batch_size=64, width=8, blocks=1)
    torch.manual_seed(0)
    model = build_model(g, layout)
    copy_ = build_model(g, layout)
    copy_.load_state_dict(model.state_dict())
    optimizer = torch.optim.AdamW(model.parameters(), lr=g.lr, weight_decay=g.weight_decay)
    loss, violation, _ = train_epoch(model, optimizer, split, g, torch.Generator().manual_seed(0),
                                     torch.device("cpu"))

    log2_hat = torch.nn.functional.softplus(copy_(split.x)[0])
    mse = ((split.log2_h - log2_hat) ** 2).mean()
    penalty = (torch.clamp(split.log2_bound - log2_hat, min=0) ** 2).mean()
    reference = torch.optim.AdamW(copy_.parameters(), lr=g.lr, weight_decay=g.weight_decay)
    (mse + 3.0 * penalty).backward()
    reference.step()
    assert loss == pytest.approx(mse.item(), rel=1e-6) and violation == pytest.approx(penalty.item(), rel=1e-6)
    assert penalty.item() > 0  # the synthetic bounds are not all below the initial predictions
    for (name, p), q in zip(model.named_parameters(), copy_.parameters(), strict=True):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-7), name


def test_a_run_that_met_its_stop_rule_stops_there_and_stays_stopped(project, monkeypatch):
    """The lifecycle of grok.stop_after_plateau (the rule itself: test_grok_diagnostics.py): the run stops
    after the validation that met it, with a checkpoint there; rerun or extended, it stays stopped; with the
    rule off, the same run goes on to its length."""
    from labpipe.grok import diagnostics
    from labpipe.grok.train import run_train

    directory, repo_params = project
    make_grok_project(directory, repo_params, stop_after_plateau=2)
    monkeypatch.setattr(diagnostics, "plateau_stop",
                        lambda history, *rule: "rule met" if history and history[-1]["epoch"] >= 6 else None)
    run_train(load_params("params.yaml"))
    metrics = json.loads((OUT_DIR / "metrics.json").read_text())
    assert metrics["epochs_run"] == 6 and metrics["stop_reason"] == "rule met"
    assert pd.read_csv(OUT_DIR / "train_history.csv").epoch.tolist() == list(range(1, 7))
    assert Checkpoints(OUT_DIR / "checkpoints", "epoch").all()[-1].name == "epoch_00000006.pt"

    run_train(load_params("params.yaml", ["grok.epochs=20"]))
    assert json.loads((OUT_DIR / "metrics.json").read_text())["epochs_run"] == 6
    run_train(load_params("params.yaml", ["grok.stop_after_plateau=0"]))  # not part of the trajectory: resumes
    metrics = json.loads((OUT_DIR / "metrics.json").read_text())
    assert metrics["epochs_run"] == 12 and metrics["stop_reason"] == "grok.epochs"


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
    from labpipe.grok.train import init_weights
    from labpipe.run import TrainingRun

    params = load_params("params.yaml", overrides)
    layout = make_layout(pd.read_parquet(TRAIN))
    model = build_model(params.grok, layout)
    with TrainingRun("grok_train", params, [TRAIN, VAL, TEST], {"model": model},
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

    # One ResNet for all experts, and the gate forced to one of them (top_k = 1): the MoE is that ResNet.
    moe, _ = _entered_weights(["grok.model=moe", "grok.experts=3", "grok.top_k=1",
                               f"grok.init_experts_from={json.dumps([str(experts[0])])}"])
    resnet, _ = _entered_weights([f"grok.init_from={experts[0]}"])
    x = encode(pd.read_parquet(VAL), moe.layout).x
    with torch.no_grad():
        assert torch.equal(moe(x)[0], resnet(x)[0])


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
