"""Every CUDA path computes what the CPU path computes (marked gpu: skipped where no CUDA device is present;
`make test-gpu` runs them on a GPU machine), and, on any machine, the parts of `make test-gpu` that need no GPU:
bench/gpu.py's CPU path and its results files, the one-line skip, the wheel list's pins."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from labpipe.config import load_params

REPO = Path(__file__).resolve().parents[1]
BENCHES = ("grok", "mheight", "hmm", "lm")


# ---- CUDA against the CPU ----------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_hmm_torch_em_on_cuda_gives_the_cpu_log_likelihoods():
    """Three epochs of minibatch EM (an M-step every 2 batches, mixed lengths, so padding and ends count) on
    each device, from the same HMM: the same log-likelihood every epoch, to 1e-6, and the same parameters."""
    from labpipe.hmm import HMM, TorchBackend, em_epoch, pad_batches

    rng = np.random.default_rng(0)
    sequences = [rng.integers(0, 30, size=int(n)) for n in rng.integers(1, 40, size=300)]
    results = {}
    for device in ("cpu", "cuda"):
        backend = TorchBackend(HMM.random(12, 30, seed=0), device)
        lls = [em_epoch(backend, pad_batches(sequences, 64, shuffle_seed=epoch), update_freq=2, eps=1e-12,
                        epoch=epoch).log_likelihood for epoch in range(3)]
        results[device] = lls, backend.hmm
    (cpu_lls, cpu_hmm), (cuda_lls, cuda_hmm) = results["cpu"], results["cuda"]
    np.testing.assert_allclose(cuda_lls, cpu_lls, rtol=1e-6)
    assert cpu_lls[2] > cpu_lls[0]  # EM climbed: the comparison is of a real run
    for name in ("start", "transition", "end", "emission"):
        np.testing.assert_allclose(getattr(cuda_hmm, name).cpu().numpy(), getattr(cpu_hmm, name).numpy(),
                                   rtol=1e-6, atol=1e-12, err_msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("chunk", [7, 4096])
def test_exact_m_heights_on_cuda_are_the_cpu_ones(chunk):
    """(10, 5) codes, integer P in [-100, 100] and codes with small minimum distance (zeros in P): every m, the
    same infinities in the same places and the same finite heights (to 1e-12: two kernels, rounding apart)."""
    from labpipe.mheight import m_heights_batch, systematic_generator

    rng = np.random.default_rng(0)
    P = rng.integers(-100, 101, size=(200, 5, 5)).astype(float)
    P[::5, 0, :] = 0  # a row of P all zero: a codeword of weight 1, h_m = inf for every m >= 1
    P[1::5, :, 0] = 0  # a column of P all zero
    P[2::5, :2, :3] = 0
    codes = np.stack([systematic_generator(p) for p in P])
    cpu = m_heights_batch(codes)
    cuda = m_heights_batch(codes, device="cuda", chunk=chunk)
    assert cuda.shape == cpu.shape == (200, 10)
    np.testing.assert_array_equal(np.isinf(cuda), np.isinf(cpu))
    assert np.isinf(cpu).any() and np.isfinite(cpu[:, 1:]).any()
    finite = np.isfinite(cpu)
    np.testing.assert_allclose(cuda[finite], cpu[finite], rtol=1e-12)


def _grok_data(rows: int, seed: int = 0):
    from labpipe.grok.features import FeatureLayout, Split

    groups = ((9, 4, 2), (9, 5, 3), (10, 5, 4))
    layout = FeatureLayout(groups, max_k=5, max_r=5, p_scale=100.0)
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(rows, layout.dim, generator=generator)
    group = torch.randint(0, len(groups), (rows,), generator=generator)
    x[:, -len(groups):] = torch.nn.functional.one_hot(group, len(groups)).float()
    return layout, Split(x, group, torch.rand(rows, generator=generator) * 20,
                         torch.rand(rows, generator=generator) * 5, excluded_infinite=0)


@pytest.mark.gpu
@pytest.mark.parametrize("model_name", ["resnet", "moe"])
def test_grok_epochs_on_the_device_resident_cuda_path_follow_the_cpu_ones(model_name):
    """grok_train's epoch (the split placed on the GPU, batches indexed there) from the same weights, in the
    same shuffled order: the same losses and gradient norms epoch by epoch and the same weights after, to float
    rounding."""
    from labpipe.grok.models import build_model
    from labpipe.grok.train import place, train_epoch

    g = load_params(REPO / "params.yaml", [f"grok.model={model_name}", "grok.width=32", "grok.blocks=2",
                                           "grok.batch_size=128", "grok.violation_coef=0.1"]).grok
    layout, split = _grok_data(1000)
    torch.manual_seed(0)
    initial = build_model(g, layout).state_dict()
    runs = {}
    for name in ("cpu", "cuda"):
        device = torch.device(name)
        torch.manual_seed(0)
        model = build_model(g, layout)
        model.load_state_dict(initial)
        model.to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=g.lr, weight_decay=g.weight_decay)
        resident = place(split, device)
        assert resident.x.device.type == name
        shuffle = torch.Generator().manual_seed(0)
        epochs = [train_epoch(model, optimizer, resident, g, shuffle, device) for _ in range(4)]
        runs[name] = np.array(epochs), {k: v.detach().cpu() for k, v in model.state_dict().items()}
    (cpu_epochs, cpu_weights), (cuda_epochs, cuda_weights) = runs["cpu"], runs["cuda"]
    np.testing.assert_allclose(cuda_epochs, cpu_epochs, rtol=1e-3, atol=1e-6)
    assert cpu_epochs[-1, 0] < cpu_epochs[0, 0]
    for key, value in cpu_weights.items():
        torch.testing.assert_close(cuda_weights[key], value, rtol=1e-3, atol=1e-4, msg=key)


def _stage_in(directory: Path, monkeypatch, make, run) -> Path:
    directory.mkdir()
    monkeypatch.chdir(directory)
    make(directory)
    run()
    return directory


@pytest.mark.gpu
def test_grok_train_stage_on_cuda_ends_where_the_cpu_stage_ends(tmp_path, monkeypatch, mlflow_store, repo_params):
    """The whole stage (MLflow run, checkpoints, metrics.json) in two projects, device cpu and device cuda: the
    same training and validation losses, to float rounding. (Two projects: device is no part of the trajectory,
    so the same project would resume the CPU run instead of training again on the GPU.)"""
    from labpipe.grok.train import run_train
    from test_grok import OUT_DIR, make_grok_project

    metrics = {}
    for device in ("cpu", "cuda"):
        _stage_in(tmp_path / device, monkeypatch,
                  lambda d, device=device: make_grok_project(d, repo_params, epochs=6, val_every=3, device=device),
                  lambda: run_train(load_params("params.yaml")))
        metrics[device] = json.loads((OUT_DIR / "metrics.json").read_text())
        history = pd.read_csv(OUT_DIR / "train_history.csv")
        assert history.epoch.tolist() == list(range(1, 7))
    for key in ("final_train_loss", "final_val_loss", "best_val_loss"):
        assert metrics["cuda"][key] == pytest.approx(metrics["cpu"][key], rel=1e-3), key
    assert metrics["cuda"]["best_epoch"] == metrics["cpu"]["best_epoch"]


@pytest.mark.gpu
def test_crosscoder_steps_on_cuda_from_the_pinned_side_stream_buffer_follow_the_cpu_steps(tmp_path):
    """The crosscoder's Adam steps fed by BatchStream (memmap -> pinned host memory -> a side-stream copy to the
    GPU) and by the same stream on the CPU, from the same init: the same loss terms step by step and the same
    weights after, to float rounding."""
    from labpipe.crosscoder.buffer import ActivationBuffer, BatchStream, write_buffer
    from labpipe.crosscoder.model import Crosscoder
    from labpipe.crosscoder.train import l1_coef_at, lr_at, train_step

    rng = np.random.default_rng(0)
    x = rng.normal(size=(4096, 48)).astype(np.float32)
    chunks = ((torch.from_numpy(x[i:i + 512, :16]), torch.from_numpy(x[i:i + 512, 16:])) for i in range(0, 4096, 512))
    write_buffer(tmp_path / "buffer", chunks, 4096, 16, 32, "bfloat16", {"test": True})
    buffer = ActivationBuffer.open(tmp_path / "buffer")
    c = load_params(REPO / "params.yaml", ["crosscoder.dict_size=128", "crosscoder.batch_size=256",
                                           "crosscoder.lr_warmup_steps=2", "crosscoder.l1_warmup_steps=4"]).crosscoder
    steps = 12
    runs = {}
    for device in ("cpu", "cuda"):
        model = Crosscoder(16, 32, c.dict_size)
        model.init_weights(c.init, c.transpose_init, c.dec_init_norm, torch.Generator().manual_seed(0))
        model.to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=c.lr)
        terms = []
        with BatchStream(buffer, c.batch_size, c.seed, 0, steps, 2, device=device) as stream:
            for t, batch in enumerate(stream):
                assert batch.device.type == device
                _, _, loss, grad_norm = train_step(model, optimizer, batch, lr_at(c, t), l1_coef_at(c, t), c)
                terms.append([loss.loss.item(), loss.mse.item(), loss.l1.item(), grad_norm.item()])
        assert len(terms) == steps
        runs[device] = np.array(terms), {k: v.detach().cpu() for k, v in model.state_dict().items()}
    (cpu_terms, cpu_weights), (cuda_terms, cuda_weights) = runs["cpu"], runs["cuda"]
    np.testing.assert_allclose(cuda_terms, cpu_terms, rtol=1e-4, atol=1e-6)
    for key, value in cpu_weights.items():
        torch.testing.assert_close(cuda_weights[key], value, rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.gpu
def test_lm_bf16_autocast_loss_is_close_to_fp32():
    """lm_train's autocast (bf16 on CUDA) against plain fp32 on CUDA and on the CPU: the same Llama, the same
    tokens, the loss within 1% (bf16 keeps ~3 digits); its gradients point the same way."""
    from labpipe.lm.train import autocast, build_model, causal_lm_loss

    lm = load_params(REPO / "params.yaml", ["lm.hidden_size=128", "lm.layers=2", "lm.heads=4",
                                            "lm.intermediate_size=256", "lm.context_length=64"]).lm
    torch.manual_seed(0)
    model = build_model(lm, 100)
    tokens = torch.randint(0, 100, (16, 64), generator=torch.Generator().manual_seed(1))
    cpu = causal_lm_loss(model, tokens).item()
    model.cuda()
    cuda_tokens = tokens.pin_memory().to("cuda", non_blocking=True)  # lm_train's pinned, asynchronous copy
    fp32 = causal_lm_loss(model, cuda_tokens)
    fp32.backward()
    fp32_grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    with autocast(torch.device("cuda")):
        bf16 = causal_lm_loss(model, cuda_tokens)
    assert bf16.dtype == torch.float32  # the loss stays fp32 under autocast
    bf16.backward()
    bf16_grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert fp32.item() == pytest.approx(cpu, rel=1e-4)
    assert bf16.item() == pytest.approx(fp32.item(), rel=1e-2)
    assert torch.nn.functional.cosine_similarity(bf16_grads, fp32_grads, dim=0) > 0.99


@pytest.mark.gpu
def test_lm_train_stage_on_cuda_bf16_follows_the_cpu_stage(tmp_path, monkeypatch, mlflow_store, repo_params):
    """The whole lm_train stage in two projects, device cpu (fp32) and device cuda (bf16 autocast, pinned
    batches copied asynchronously): the same step losses to bf16's rounding, and both write their model."""
    from labpipe.hmm import HMM
    from labpipe.lm.train import run_train
    from test_lm import OUT_DIR, lm_project, write_dataset

    losses = {}
    for device in ("cpu", "cuda"):
        def make(directory, device=device):
            write_dataset(HMM.random(3, 5, seed=0))
            lm_project(directory, repo_params, device=device, max_steps=10, decay_steps=10, eval_every=5,
                       checkpoint_every=5)

        _stage_in(tmp_path / device, monkeypatch, make, lambda: run_train(load_params("params.yaml")))
        losses[device] = pd.read_csv(OUT_DIR / "history.csv").train_loss.to_numpy()
        assert (OUT_DIR / "metrics.json").exists()
    assert len(losses["cuda"]) == len(losses["cpu"]) == 10
    np.testing.assert_allclose(losses["cuda"], losses["cpu"], rtol=2e-2)


@pytest.mark.gpu
def test_doctor_require_cuda_passes(tmp_path):
    """`labpipe doctor --require-cuda` exits 0 where a GPU is usable, and says so."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    done = subprocess.run([sys.executable, "-m", "labpipe", "doctor", "--require-cuda", "--json"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] and report["checks"]["cuda"]["status"] == "ok"
    assert report["checks"]["torch"]["build"] == "cuda" and report["checks"]["torch"]["devices"]


# ---- make test-gpu's parts that need no GPU ----------------------------------------------------------------------


def test_the_bench_runner_writes_every_cpu_figure_to_json_and_markdown(tmp_path):
    """bench/gpu.py --quick --cpu-only: every bench's CPU path at a tiny size, the results in one JSON and one
    markdown file in --out, the markdown printed."""
    done = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py"), "--quick", "--cpu-only", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OUT": str(tmp_path / "not-here")})
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["schema"] == 1 and results["quick"] is True and results["cuda"] is False
    assert results["failed"] == []
    assert {"python", "torch", "torch_cuda", "gpu", "cpu_count"} <= set(results["host"])
    assert list(results["benches"]) == list(BENCHES)
    units = {"grok": "epochs/s", "hmm": "tokens/s", "lm": "tokens/s", "mheight": "codes/s"}
    for name, bench in results["benches"].items():
        assert bench["status"] == "ok" and bench["seconds"] > 0, name
        assert bench["config"] and bench["ratios"] == [], name  # ratios compare against CUDA figures
        (row,) = bench["rows"]
        assert row["device"] == "cpu" and row["unit"] == units[name] and row["value"] > 0, (name, row)
    assert results["benches"]["lm"]["rows"][0]["model_flops"] > 0
    assert results["benches"]["hmm"]["rows"][0]["log_likelihood"] < 0
    markdown = (tmp_path / "results.md").read_text()
    assert all(f"## {name}" in markdown for name in BENCHES) and "no CUDA device" in markdown
    assert markdown.strip() in done.stdout
    assert not (tmp_path / "not-here").exists()


def test_the_bench_runner_records_a_failed_bench_and_exits_1(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import gpu

    def broken(size, cuda):
        raise RuntimeError("no such kernel")

    monkeypatch.setitem(gpu.RUNNERS, "grok", broken)
    monkeypatch.setitem(gpu.RUNNERS, "hmm", lambda size, cuda: {"config": {"x": 1.0}, "rows": [
        gpu.row("a figure", "cpu", float("inf"), "things/s")], "ratios": []})
    assert gpu.main(["--quick", "--cpu-only", "--only", "grok,hmm", "--out", str(tmp_path)]) == 1
    results = json.loads((tmp_path / "results.json").read_text())  # strict JSON: inf as a string
    assert results["failed"] == ["grok"] and "no such kernel" in results["benches"]["grok"]["error"]
    assert results["benches"]["hmm"]["rows"][0]["value"] == "inf"
    assert "FAILED" in (tmp_path / "results.md").read_text() and "FAILED: grok" in capsys.readouterr().out


@pytest.mark.skipif(subprocess.run("nvidia-smi -L 2>/dev/null | grep -q '^GPU'", shell=True).returncode == 0,
                    reason="an NVIDIA GPU is present: make test-gpu would run")
def test_make_test_gpu_without_a_gpu_prints_one_line_and_sets_up_nothing():
    before = (REPO / ".venv-gpu").exists()
    done = subprocess.run(["make", "--no-print-directory", "test-gpu"], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "make test-gpu: no NVIDIA GPU here (nvidia-smi -L lists none): skipped, nothing set up"]
    assert done.stderr == "" and (REPO / ".venv-gpu").exists() == before


def test_the_gpu_wheel_list_is_pinned_as_the_lock():
    """tests/gpu/requirements.txt: one name==version a package, each the version docker/constraints.txt locks."""
    def pins(path: Path) -> list[tuple[str, str]]:
        lines = [line.split(";")[0].strip() for line in path.read_text().splitlines()]
        return [tuple(line.split("==")) for line in lines if line and not line.startswith("#")]

    wanted = pins(REPO / "tests" / "gpu" / "requirements.txt")
    names = [name.lower().replace("_", "-") for name, _ in wanted]
    assert len(names) == len(set(names)) and {"mlflow", "pomegranate", "analog-ecc-heights"} <= set(names)
    lock = {name.lower().replace("_", "-"): version for name, version in pins(REPO / "docker" / "constraints.txt")}
    assert {name: version for (_, version), name in zip(wanted, names, strict=True) if lock.get(name, version)
            != version} == {}
    assert not {"dvc", "wandb", "datasets", "submitit", "torch"} & set(names)
