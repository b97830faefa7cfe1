"""labpipe mheight-predict: a saved regressor's own predictions, exact heights, per-group errors, bad inputs.

The model is built here (build_model on the layout of a tiny frame) and saved as grok_train saves it; its
predictions are recomputed in the test from an encoding written out independently.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import load_repo_params, run_labpipe
from labpipe.config import GrokParams, build, flatten
from labpipe.files import save_torch
from labpipe.grok.features import make_layout
from labpipe.grok.models import build_model, log2_prediction
from labpipe.grok.predict import load_regressor, random_codes, read_codes
from labpipe.mheight import m_heights_batch

# n=9, k=4, m=5 = n-k: some random integer codes are not MDS (d < 6), so their h_5 is infinite
GROUPS = [(9, 4, 2), (9, 4, 3), (9, 4, 5), (9, 5, 2)]


def grok_params(**overrides) -> GrokParams:
    raw = {**load_repo_params()["grok"], "width": 16, "blocks": 1, **overrides}
    return build(GrokParams, raw, where="test", prefix="grok.")


def codes(count: int = 40, seed: int = 0) -> pd.DataFrame:
    return pd.concat([random_codes(count, n, k, m, seed) for n, k, m in GROUPS], ignore_index=True)


def save_model(path, params: GrokParams, frame: pd.DataFrame) -> torch.nn.Module:
    """A freshly initialised regressor for the groups of `frame`, saved as grok_train's write_outputs does."""
    torch.manual_seed(0)
    layout = make_layout(frame)
    model = build_model(params, layout)
    save_torch({"model": model.state_dict(), "layout": dataclasses.asdict(layout), "params": flatten(params),
                "epoch": 0, "val_loss": 1.0}, path)
    return model


def expected_log2(model: torch.nn.Module, frame: pd.DataFrame) -> np.ndarray:
    """forward + log2_prediction on x written out here: P / p_scale zero-padded to max_k x max_r, row-major,
    then the one-hot of the group's index in the layout. One batch per group, as the CLI batches: a row's
    float32 result can change in the last bit with the batch it is in (the BLAS kernel depends on its size)."""
    layout = model.layout
    x = np.zeros((len(frame), layout.max_k * layout.max_r + len(layout.groups)), dtype=np.float32)
    for row, (n, k, m, P) in enumerate(zip(frame.n, frame.k, frame.m, frame.P, strict=True)):
        padded = np.zeros((layout.max_k, layout.max_r))
        padded[:k, : n - k] = np.reshape(P, (k, n - k)) / layout.p_scale
        x[row, : padded.size] = padded.ravel()
        x[row, padded.size + layout.groups.index((n, k, m))] = 1
    log2_h = np.empty(len(frame))
    with torch.no_grad():
        for rows in frame.groupby(["n", "k", "m"]).indices.values():
            z, _aux = model.eval()(torch.from_numpy(x[rows]))
            log2_h[rows] = log2_prediction(z, model.output_head).double().numpy()
    return log2_h


def exact(frame: pd.DataFrame) -> np.ndarray:
    out = []
    for n, k, m, P in zip(frame.n, frame.k, frame.m, frame.P, strict=True):
        G = np.hstack([np.eye(k), np.reshape(P, (k, n - k))])
        out.append(m_heights_batch(G[None])[0, m])
    return np.array(out)


@pytest.fixture
def saved(tmp_path):
    frame = codes()
    model = save_model(tmp_path / "model.pt", grok_params(), frame)
    return tmp_path, frame, model


def one_line_error(done) -> str:
    assert done.returncode != 0, done.stdout
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("labpipe mheight-predict: error: ")
    return done.stderr


# ----------------------------------------------------------------------------- predictions


@pytest.mark.parametrize("overrides", [{}, {"model": "moe", "experts": 2, "top_k": 1, "output_head": "seed"}],
                         ids=["resnet-log2", "moe-seed"])
def test_predictions_are_the_models_own(tmp_path, overrides):
    frame = codes()
    model = save_model(tmp_path / "model.pt", grok_params(**overrides), frame)
    # A dataset's extra columns (height, split, bound) are not read
    frame.assign(height=1.0, split="test").sample(frac=1, random_state=0).to_parquet(tmp_path / "codes.parquet",
                                                                                        index=False)
    shuffled = pd.read_parquet(tmp_path / "codes.parquet")
    done = run_labpipe(tmp_path, ["mheight-predict", "codes.parquet", "--model", "model.pt", "--out", "p.parquet",
                                  "--device", "cpu"])
    assert done.returncode == 0, done.stderr
    out = pd.read_parquet(tmp_path / "p.parquet")
    assert list(out.columns) == ["n", "k", "m", "P", "predicted_height", "predicted_log2"]
    assert out[["n", "k", "m"]].equals(shuffled[["n", "k", "m"]].astype(out.n.dtype))
    assert all(np.array_equal(a, b) for a, b in zip(out.P, shuffled.P, strict=True))
    want = expected_log2(model, shuffled)
    assert np.array_equal(out.predicted_log2.to_numpy(), want)
    assert np.allclose(out.predicted_height, 2.0 ** want, rtol=1e-15, atol=0)  # exp2 and pow: last bit
    assert [line.split(":")[0] for line in done.stdout.splitlines()[:-1]] == \
        [f"n={n} k={k} m={m}" for n, k, m in GROUPS]
    assert all(line.endswith("codes/s") and "40 rows" in line for line in done.stdout.splitlines()[:-1])


def test_exact_heights_and_per_group_errors(saved):
    directory, frame, model = saved
    # CSV input, P a JSON list; a zero row in P gives the code distance 1: infinite h_m for every m >= 1
    frame.loc[3, "P"] = np.r_[np.zeros(5), frame.P[3][5:]]
    frame.assign(P=[json.dumps(p.tolist()) for p in frame.P]).to_csv(directory / "codes.csv", index=False)
    done = run_labpipe(directory, ["mheight-predict", "codes.csv", "--model", "model.pt", "--exact", "--out",
                                   "p.csv", "--device", "cpu"])
    assert done.returncode == 0, done.stderr
    out = read_codes(directory / "p.csv")  # what --out .csv writes reads back as codes
    assert all(np.array_equal(a, b) for a, b in zip(out.P, frame.P, strict=True))
    out = pd.read_csv(directory / "p.csv")
    heights = exact(frame)
    assert np.isinf(heights[3]) and np.isinf(heights).sum() > 1  # the zero row, and some non-MDS codes at m=5
    assert np.array_equal(out.exact_height.to_numpy(), heights)
    want = expected_log2(model, frame)
    finite = np.isfinite(heights)
    assert np.allclose(out.predicted_log2, want, rtol=1e-15, atol=0)  # through CSV text: repr round-trips
    assert np.allclose(out.log2_error[finite], want[finite] - np.log2(heights[finite]), rtol=1e-12)
    assert out.log2_error[~finite].isna().all()

    reported = json.loads((directory / "p.json").read_text())["groups"]
    table = pd.DataFrame({"n": frame.n, "k": frame.k, "m": frame.m, "finite": finite,
                          "error": want - np.log2(heights)})
    for (n, k, m), rows in table.groupby(["n", "k", "m"]):
        errors = rows.error[rows.finite]
        group = reported[f"n{n}_k{k}_m{m}"]
        assert group["rows"] == len(rows) and group["infinite"] == (~rows.finite).sum()
        assert group["log2_mse"] == pytest.approx((errors ** 2).mean(), rel=1e-12)
        assert group["below_exact"] == pytest.approx((errors < 0).mean(), rel=1e-12)
        line = next(line for line in done.stdout.splitlines() if line.startswith(f"n={n} k={k} m={m}:"))
        assert f"log2-MSE {(errors ** 2).mean():.4g}," in line and f"{(errors < 0).mean():.1%} below exact" in line
    assert reported["all"]["log2_mse"] == pytest.approx((table.error[finite] ** 2).mean(), rel=1e-12)
    assert reported["all"]["infinite"] == (~finite).sum()


def test_npy_input_and_random_codes(saved):
    directory, frame, model = saved
    group = frame[(frame.n == 9) & (frame.k == 4) & (frame.m == 3)].reset_index(drop=True)
    np.save(directory / "codes.npy", np.stack(group.P).reshape(len(group), 4, 5))
    done = run_labpipe(directory, ["mheight-predict", "codes.npy", "--m", "3", "--model", "model.pt", "--out",
                                   "p.parquet", "--device", "cpu"])
    assert done.returncode == 0, done.stderr
    assert np.array_equal(pd.read_parquet(directory / "p.parquet").predicted_log2, expected_log2(model, group))

    drawn = random_codes(500, 9, 4, 3, seed=7)
    P = np.stack(drawn.P)
    assert P.shape == (500, 20) and np.array_equal(P, np.round(P)) and P.min() == -100 and P.max() == 100
    assert np.array_equal(P, np.stack(random_codes(500, 9, 4, 3, seed=7).P))
    assert not np.array_equal(P, np.stack(random_codes(500, 9, 4, 3, seed=8).P))
    done = run_labpipe(directory, ["mheight-predict", "--random", "500", "--n", "9", "--k", "4", "--m", "3",
                                   "--seed", "7", "--model", "model.pt", "--device", "cpu"])
    assert done.returncode == 0, done.stderr
    out = pd.read_parquet(directory / "predictions.parquet")  # the default --out
    assert np.array_equal(np.stack(out.P), P)
    assert np.array_equal(out.predicted_log2, expected_log2(model, drawn))


def test_a_champion_logged_to_mlflow_predicts_as_its_model_file(saved, mlflow_store):
    from labpipe.config import TrackingParams
    from labpipe.tracking import register_if_better, stage_run

    directory, frame, _model = saved
    model = load_regressor(str(directory / "model.pt"))
    tracking = TrackingParams("off", "labpipe-tests", system_metrics=False, system_metrics_interval_s=10.0)
    with stage_run(tracking, "grok_train", {}) as run:
        register_if_better(run.log_torch_model(model), "mheight-regressor", "val_loss", 1.0)
    frame.to_parquet(directory / "codes.parquet")
    by_file = run_labpipe(directory, ["mheight-predict", "codes.parquet", "--model", "model.pt", "--out",
                                      "file.parquet", "--device", "cpu"])
    by_uri = run_labpipe(directory, ["mheight-predict", "codes.parquet", "--out", "uri.parquet", "--device", "cpu"])
    assert by_file.returncode == 0 and by_uri.returncode == 0, by_uri.stderr
    assert np.array_equal(pd.read_parquet(directory / "uri.parquet").predicted_log2,
                          pd.read_parquet(directory / "file.parquet").predicted_log2)
    named = one_line_error(run_labpipe(directory, ["mheight-predict", "codes.parquet", "--model",
                                                   "models:/no-such-model@champion"]))
    assert "models:/no-such-model@champion: cannot load the model" in named


# ----------------------------------------------------------------------------- a user's mistakes


def old_model(directory) -> list[str]:
    saved = torch.load(directory / "model.pt", weights_only=True)
    del saved["params"]["output_head"]
    torch.save(saved, directory / "old.pt")
    return ["--random", "3", "--n", "9", "--k", "4", "--model", "old.pt"]


def bad_npy(directory) -> list[str]:
    np.save(directory / "flat.npy", np.ones((3, 20)))
    return ["flat.npy", "--m", "3", "--model", "model.pt"]


def empty_npy(directory) -> list[str]:
    np.save(directory / "empty.npy", np.ones((0, 4, 5)))
    return ["empty.npy", "--m", "3", "--model", "model.pt"]


def no_column(directory) -> list[str]:
    codes(2).drop(columns="m").to_parquet(directory / "nom.parquet")
    return ["nom.parquet", "--model", "model.pt"]


def short_p(directory) -> list[str]:
    (directory / "short.csv").write_text('n,k,m,P\n9,4,2,"[1, 2, 3]"\n')
    return ["short.csv", "--model", "model.pt"]


@pytest.mark.parametrize(("make_args", "named"), [
    (lambda d: ["--random", "3", "--n", "10", "--k", "5", "--m", "3", "--model", "model.pt"],
     "model.pt: group n=10 k=5 m=3 does not occur in the model's training data ((9, 4, 2), "),
    (lambda d: ["missing.parquet", "--model", "model.pt"], "missing.parquet: no such file"),
    (lambda d: ["--random", "3", "--model", "missing.pt"], "missing.pt: no such file"),
    (bad_npy, "flat.npy: an array of shape (3, 20) (float64); expected (N, k, n-k)"),
    (lambda d: [*bad_npy(d)[:1], "--model", "model.pt"], "flat.npy: a .npy of P matrices does not say m: give --m"),
    (empty_npy, "empty.npy: holds no codes"),
    (no_column, "nom.parquet: no column(s) m; codes need columns n, k, m, P"),
    (short_p, "short.csv row 0: P must hold k(n-k) = 20 finite numbers"),
    (old_model, "old.pt: written by an older labpipe (its params lack grok.output_head)"),
    (lambda d: ["--random", "3", "--out", "p.txt", "--model", "model.pt"], "--out p.txt: must end in .parquet"),
    (lambda d: ["--random", "3"], "models:/mheight-regressor@champion: no MLflow store at sqlite:///"),
], ids=["unknown group", "missing input", "missing model", "npy shape", "npy without m", "empty npy", "no column",
        "short P", "old model", "bad --out", "no store"])
def test_a_mistake_is_one_line_naming_it(saved, monkeypatch, make_args, named):
    directory, _frame, _model = saved
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the default store: mlflow.db here, which is absent
    done = run_labpipe(directory, ["mheight-predict", *make_args(directory), "--device", "cpu"])
    assert named in one_line_error(done)
    assert done.returncode == 2
    assert not (directory / "predictions.parquet").exists() and not (directory / "mlflow.db").exists()
