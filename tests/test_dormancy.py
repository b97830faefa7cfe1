"""Dormant-neuron analysis on tiny GPT-NeoX and Llama checkpoints, against activations recomputed by hand."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from mlflow import MlflowClient
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from conftest import REPO, run_labpipe, write_params
from labpipe.cli import profile_flags
from labpipe.config import load_params
from labpipe.dormancy import plots
from labpipe.dormancy.analysis import run_dormancy
from labpipe.dormancy.results import COLUMNS
from labpipe.synth.manifest import MANIFEST, Shard, write_manifest

WORDS = "the a dog cat ran sat on mat . big small red".split()
# The lab's 10 Pythia checkpoints: the steps of its first_results_Pythia-70m-dedup (seed 003)
SEED_STEPS = [1000, 14000, 46000, 78000, 94000, 110000, 126000, 133000, 138000, 143000]
TEXTS = ["the dog ran .", "a big red cat sat on the mat .", "the cat .", "a small dog sat on a red mat . the end"]


def tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(dict.fromkeys(WORDS))}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]")


def build(arch: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    common = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32,
              "vocab_size": 16, "max_position_embeddings": 32}
    if arch == "gpt_neox":
        model = GPTNeoXForCausalLM(GPTNeoXConfig(**common))
        dead = model.gpt_neox.layers[1].mlp.dense_h_to_4h  # GELU(0) = 0: neurons 0-3 of layer 1 always zero
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
        dead = model.model.layers[1].mlp.up_proj  # silu(gate) * 0 = 0
    with torch.no_grad():
        dead.weight[:4] = 0
        if dead.bias is not None:
            dead.bias[:4] = 0
    return model.eval()


def save_revisions(directory: Path, arch: str, steps=(10, 20)) -> dict[int, torch.nn.Module]:
    models = {}
    for step in steps:
        model = build(arch, seed=step)
        model.save_pretrained(directory / f"step_{step:08d}")
        tokenizer().save_pretrained(directory / f"step_{step:08d}")
        models[step] = model
    return models


def mlp_neurons_by_hand(model: torch.nn.Module, ids: torch.Tensor) -> list[np.ndarray]:
    """Each layer's MLP activation for one unpadded sequence (1, length), from the MLP's input and its weights."""
    inputs = []
    layers = model.gpt_neox.layers if hasattr(model, "gpt_neox") else model.model.layers
    handles = [layer.mlp.register_forward_pre_hook(lambda _m, args: inputs.append(args[0][0])) for layer in layers]
    with torch.no_grad():
        model(input_ids=ids)
        for handle in handles:
            handle.remove()
        out = []
        for layer, x in zip(layers, inputs, strict=True):
            mlp = layer.mlp
            if hasattr(mlp, "dense_h_to_4h"):
                h = F.gelu(x @ mlp.dense_h_to_4h.weight.T + mlp.dense_h_to_4h.bias)
            else:
                h = F.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)
            out.append(h.double().numpy())
    return out


def expected_rows(model, texts, thresholds):
    """The CSV's numbers, from each text alone (no padding); `texts` may also be rows of token ids."""
    sequences = [tokenizer()(t, return_tensors="pt")["input_ids"] if isinstance(t, str) else torch.as_tensor(t)[None]
                 for t in texts]
    per_layer = [np.concatenate(layer) for layer in zip(*(mlp_neurons_by_hand(model, s) for s in sequences),
                                                        strict=True)]
    rows = []
    for tau in thresholds:
        for index, h in enumerate(per_layer):
            mean_abs = np.abs(h).mean(0)
            score = mean_abs / mean_abs.mean()
            rows.append({"threshold": tau, "layer_index": index, "num_dormant": int((score <= tau).sum()),
                         "avg_activation": mean_abs.mean(), "max_activation": np.abs(h).max()})
    return rows


@pytest.fixture
def text_project(project):
    directory, repo_params = project
    (directory / "stories.txt").write_text("\n<|endoftext|>\n".join(TEXTS) + "\n")
    return directory, repo_params


def _params(directory, repo_params, **dormancy):
    write_params(directory, {**repo_params, "dormancy": {**repo_params["dormancy"], "model": "ckpt",
                                                         "text_source": str(directory / "stories.txt"),
                                                         "samples": 10, "batch_size": 3, "max_length": 32,
                                                         "thresholds": [0.0, 0.5, 1.0], "device": "cpu",
                                                         **dormancy}})
    return load_params(directory / "params.yaml")


@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
def test_scores_match_activations_recomputed_by_hand_with_padding_in_the_batch(text_project, arch):
    directory, repo_params = text_project
    models = save_revisions(directory / "ckpt", arch)
    run_dormancy(_params(directory, repo_params))
    results = pd.read_csv("artifacts/dormancy/results.csv")
    assert list(results.columns) == COLUMNS
    assert len(results) == 2 * 3 * 2  # revisions x thresholds x layers
    for step, model in models.items():
        got = results[results.step == step].sort_values(["threshold", "layer_index"])
        for row, expected in zip(got.itertuples(), expected_rows(model, TEXTS, [0.0, 0.5, 1.0]), strict=True):
            assert row.num_dormant == expected["num_dormant"], (step, row)
            assert row.avg_activation == pytest.approx(expected["avg_activation"], rel=1e-5)
            assert row.max_activation == pytest.approx(expected["max_activation"], rel=1e-5)
            assert row.num_neurons == 32 and row.pct_dormant == pytest.approx(100 * row.num_dormant / 32)
    # tau = 0 counts exactly the neurons zeroed on purpose (4 in layer 1), none in layer 0
    at_zero = results[results.threshold == 0.0]
    assert set(at_zero[at_zero.layer_index == 1].num_dormant) == {4}
    assert set(at_zero[at_zero.layer_index == 0].num_dormant) == {0}
    assert (results.groupby(["step", "layer_index"]).num_dormant.apply(lambda s: s.is_monotonic_increasing)).all()
    # MLflow: % dormant per layer and threshold at step = training step, and the three plots
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("dormant-neurons").experiment_id])
    history = client.get_metric_history(run.info.run_id, "pct_dormant/tau_0/layer_1")
    assert [(m.step, m.value) for m in history] == [(10, 12.5), (20, 12.5)]
    means = client.get_metric_history(run.info.run_id, "pct_dormant/tau_0.5/mean")
    assert [m.value for m in means] == pytest.approx(
        [results[(results.step == step) & (results.threshold == 0.5)].pct_dormant.mean() for step in (10, 20)])
    logged = sorted(a.path for a in client.list_artifacts(run.info.run_id, "plots"))
    assert logged == ["plots/dormancy_heatmap.png", "plots/dormancy_over_steps.png", "plots/layer_evolution.png"]
    assert all((directory / "artifacts/dormancy" / p).exists() for p in logged)


def test_synth_text_is_the_first_samples_of_the_val_shards(project):
    """text_source=synth: token ids of the val shards (not train), across shards, cut to max_length."""
    directory, repo_params = project
    rng = np.random.default_rng(0)
    val = [rng.integers(2, 16, (3, 12)), rng.integers(2, 16, (3, 12))]
    shards, out = [], directory / "shards"
    out.mkdir()
    for index, (split, rows) in enumerate([("train", np.zeros((3, 12), int)), ("val", val[0]), ("val", val[1])]):
        name = f"{split}_{index:05d}.bin"
        (out / name).write_bytes(rows.astype("<u2").tobytes())
        shards.append(Shard(split, index, name, rows.size, len(rows), "0" * 64, index, ()))
    write_manifest(MANIFEST, {"dtype": "<u2", "vocab_size": 16, "seq_length": 12, "sequences_per_shard": 3,
                              "start": "stationary", "permute_emissions": False, "block_sequences": 3, "hmm": {},
                              "out_dir": str(out)}, shards)
    model = save_revisions(directory / "ckpt", "gpt_neox", steps=(10,))[10]
    # the model: one save_pretrained directory, its own revision
    run_dormancy(_params(directory, repo_params, model="ckpt/step_00000010", text_source="synth", samples=5,
                         max_length=8, batch_size=2, thresholds=[0.5]))
    results = pd.read_csv("artifacts/dormancy/results.csv")
    assert set(results.revision) == {"step_00000010"} and set(results.step) == {10}
    used = np.concatenate(val)[:5, :8]
    for row, expected in zip(results.itertuples(), expected_rows(model, used, [0.5]), strict=True):
        assert row.num_dormant == expected["num_dormant"]
        assert row.avg_activation == pytest.approx(expected["avg_activation"], rel=1e-5)
        assert row.max_activation == pytest.approx(expected["max_activation"], rel=1e-5)


def test_an_interrupted_run_resumes_to_the_same_csv(text_project):
    directory, repo_params = text_project
    save_revisions(directory / "ckpt", "llama", steps=(10, 20, 30))
    run_dormancy(_params(directory, repo_params, output_csv="one/results.csv"))
    # "interrupted" after the first revision: a run limited to it, then the full run skips what is there
    run_dormancy(_params(directory, repo_params, output_csv="two/results.csv", max_revisions=1))
    run_dormancy(_params(directory, repo_params, output_csv="two/results.csv"))
    one, two = (pd.read_csv(f"{name}/results.csv").drop(columns="timestamp") for name in ("one", "two"))
    pd.testing.assert_frame_equal(one, two)
    # a rerun adds nothing
    run_dormancy(_params(directory, repo_params, output_csv="two/results.csv"))
    assert len(pd.read_csv("two/results.csv")) == len(one)
    # rows made from other text are never mixed in
    with pytest.raises(ValueError, match=r"two/results.csv holds rows made with .*'samples': 10.*'samples': 2"):
        run_dormancy(_params(directory, repo_params, output_csv="two/results.csv", samples=2))
    assert len(pd.read_csv("two/results.csv")) == len(one)


def test_plots_show_the_expected_series(tmp_path, monkeypatch):
    rows = [{"timestamp": "t", "model": "m", "revision": f"step{s}", "step": s, "threshold": tau,
             "layer_name": f"l{i}", "layer_index": i, "num_neurons": 10, "num_dormant": 0,
             "pct_dormant": p if tau == 0.1 else 0.0, "avg_activation": 1.0, "max_activation": 2.0}
            for tau in (0.0, 0.1, 0.5)
            for s, pcts in ((1, [0, 10, 20]), (2, [0, 50, 20]), (3, [0, 90, 30])) for i, p in enumerate(pcts)]
    results = pd.DataFrame(rows, columns=COLUMNS)
    saved = []  # every figure, as it is saved
    savefig = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda figure, *args, **kwargs: (saved.append(figure),
                                                                            savefig(figure, *args, **kwargs)))
    paths = plots.save_plots(results, f"{tmp_path}/x_", max_layers_heatmap=2, num_layers_evolution=2)
    assert [p.name for p in paths] == ["x_dormancy_over_steps.png", "x_dormancy_heatmap.png", "x_layer_evolution.png"]
    assert all(p.stat().st_size > 0 for p in paths)
    over, heat, evolution = (figure.axes[0] for figure in saved)
    # tau = 0.1 by default (not the largest, 0.5): mean across layers, and the min..max band
    assert "tau = 0.1" in over.get_title()
    np.testing.assert_allclose(over.lines[0].get_xdata(), [1, 2, 3])
    np.testing.assert_allclose(over.lines[0].get_ydata(), [10, 70 / 3, 40])
    band = over.collections[0].get_paths()[0].vertices
    np.testing.assert_allclose(sorted(set(band[:, 1])), [0, 20, 50, 90])  # min 0 everywhere; max 20, 50, 90
    # layers x steps, the first two layers
    np.testing.assert_allclose(heat.images[0].get_array(), [[0, 0, 0], [10, 50, 90]])
    # the two layers that vary most: layer 1, then layer 2
    assert [line.get_label() for line in evolution.lines] == ["layer 1", "layer 2"]
    np.testing.assert_allclose([line.get_ydata() for line in evolution.lines], [[10, 50, 90], [20, 20, 30]])
    saved.clear()
    plots.save_plots(results, f"{tmp_path}/y_", threshold=0.5)
    assert "tau = 0.5" in saved[0].axes[0].get_title() and list(saved[0].axes[0].lines[0].get_ydata()) == [0, 0, 0]


def test_the_plot_verb_plots_one_model_and_names_the_choices(tmp_path, capsys):
    rows = [{"timestamp": "t", "model": model, "revision": f"step{s}", "step": s, "threshold": 0.1,
             "layer_name": "l0", "layer_index": 0, "num_neurons": 10, "num_dormant": s,
             "pct_dormant": 10.0 * s, "avg_activation": 1.0, "max_activation": 2.0}
            for model in ("a", "b") for s in (1, 2)]
    pd.DataFrame(rows, columns=COLUMNS).to_csv(tmp_path / "two.csv", index=False)
    assert plots.main([str(tmp_path / "two.csv"), "--no-show", "--save-prefix", f"{tmp_path}/"]) == 2
    assert "the CSV holds several models (a, b): choose one with --model" in capsys.readouterr().err
    assert plots.main([str(tmp_path / "two.csv"), "--no-show", "--save-prefix", f"{tmp_path}/", "--model", "b"]) == 0
    assert "threshold 0.1: 2 revisions, 1 layers" in capsys.readouterr().out
    assert plots.main([str(tmp_path / "none.csv"), "--no-show"]) == 2
    assert "none.csv: no such file" in capsys.readouterr().err


def test_the_cli_quick_flag_and_the_plot_verb(text_project):
    directory, repo_params = text_project
    save_revisions(directory / "ckpt", "gpt_neox", steps=(10, 20, 30))
    _params(directory, repo_params, samples=500)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "labpipe", "dormancy", "--quick", "--device", "cpu",
                           "--thresholds", "0,0.1"], cwd=directory, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    # a CSV of its own beside the stage's, which stays untouched
    assert not (directory / "artifacts/dormancy/results.csv").exists()
    results = pd.read_csv(directory / "artifacts/dormancy/quick/test_results.csv")
    assert sorted(results.step.unique()) == [10, 20] and sorted(results.threshold.unique()) == [0.0, 0.1]
    settings = json.loads((directory / "artifacts/dormancy/quick/test_results.csv.settings.json").read_text())
    assert settings["samples"] == 100  # --quick's, over params.yaml's 500
    assert (directory / "artifacts/dormancy/quick/plots/dormancy_heatmap.png").exists()
    plotted = subprocess.run([sys.executable, "-m", "labpipe", "dormancy-plot",
                              "artifacts/dormancy/quick/test_results.csv", "--no-show", "--save-prefix", "p/"],
                             cwd=directory, capture_output=True, text=True)
    assert plotted.returncode == 0, plotted.stderr
    assert "threshold 0.1: 2 revisions, 2 layers" in plotted.stdout
    assert (directory / "p/dormancy_heatmap.png").exists()


def hub_cache(cache: Path, name: str, arch: str, steps) -> dict[int, torch.nn.Module]:
    """Models at hub revisions step<N>, in a cache laid out like the hub's (what from_pretrained reads offline)."""
    repo = cache / f"models--{name.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    models = {}
    for step in steps:
        commit = f"{step:040x}"
        models[step] = build(arch, seed=step)
        models[step].save_pretrained(repo / "snapshots" / commit)
        tokenizer().save_pretrained(repo / "snapshots" / commit)
        (repo / "refs" / f"step{step}").write_text(commit)
    return models


def test_the_pythia_profile_is_the_seeds_full_analysis():
    flags = profile_flags(str(REPO / "params.yaml"), str(REPO / "params.pythia.yaml"))  # checked by the schema
    d = load_params(REPO / "params.yaml", [flag.removeprefix("-S ") for flag in flags]).dormancy
    assert d.model == "EleutherAI/pythia-70m-deduped"
    assert d.revisions == tuple(f"step{step}" for step in SEED_STEPS) and d.max_revisions == 0
    assert (d.samples, d.batch_size, d.thresholds, d.layers) == (500, 8, (0.0, 0.025, 0.1), ())
    assert d.text_source == "NeelNanda/pile-10k" and (d.text_split, d.text_field) == ("train", "text")
    assert d.output_csv == "artifacts/pythia/pythia_analysis.csv"


def test_quick_on_the_pythia_profile_is_the_seeds_quick_test(text_project, tmp_path):
    """--profile params.pythia.yaml --quick: step1000 and step14000 of the hub model, 100 samples, every tau, into
    test_pythia_analysis.csv; each revision's numbers from its own weights, recomputed by hand."""
    directory, _repo_params = text_project
    cache = tmp_path / "hub"
    models = hub_cache(cache, "EleutherAI/pythia-70m-deduped", "gpt_neox", SEED_STEPS[:2])  # no other revision
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    done = subprocess.run([sys.executable, "-m", "labpipe", "dormancy", "--profile", str(REPO / "params.pythia.yaml"),
                           "--quick", "--device", "cpu", "--set", f"dormancy.text_source={directory / 'stories.txt'}"],
                          cwd=directory, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    csv = directory / "artifacts/pythia/quick/test_pythia_analysis.csv"
    results = pd.read_csv(csv)
    assert set(results.model) == {"EleutherAI/pythia-70m-deduped"}
    assert list(results.revision.unique()) == ["step1000", "step14000"] and list(results.step.unique()) == [1000, 14000]
    assert json.loads(Path(f"{csv}.settings.json").read_text())["samples"] == 100
    thresholds = [0.0, 0.025, 0.1]
    for step, model in models.items():
        got = results[results.step == step].sort_values(["threshold", "layer_index"])
        expected = expected_rows(model, TEXTS, thresholds)
        assert list(got.threshold) == [e["threshold"] for e in expected]
        assert list(got.layer_name) == ["gpt_neox.layers.0.mlp.act", "gpt_neox.layers.1.mlp.act"] * 3
        assert list(got.num_dormant) == [e["num_dormant"] for e in expected]
        assert list(got.avg_activation) == pytest.approx([e["avg_activation"] for e in expected], rel=1e-5)
        assert list(got.max_activation) == pytest.approx([e["max_activation"] for e in expected], rel=1e-5)
    # the full analysis' CSV and the stage's are not touched
    assert not (directory / "artifacts/pythia/pythia_analysis.csv").exists()
    assert not (directory / "artifacts/dormancy/results.csv").exists()


def test_layers_analyses_the_chosen_layers_only(text_project):
    directory, repo_params = text_project
    models = save_revisions(directory / "ckpt", "llama", steps=(10,))
    _params(directory, repo_params)
    done = run_labpipe(directory, ["dormancy", "--layers", "1", "--thresholds", "0,0.5"])
    assert done.returncode == 0, done.stderr
    results = pd.read_csv("artifacts/dormancy/results.csv")
    layer_1 = [e for e in expected_rows(models[10], TEXTS, [0.0, 0.5]) if e["layer_index"] == 1]
    assert list(results.layer_index) == [1, 1] and set(results.layer_name) == {"model.layers.1.mlp.down_proj"}
    assert list(results.num_dormant) == [e["num_dormant"] for e in layer_1] and layer_1[0]["num_dormant"] == 4
    assert list(results.avg_activation) == pytest.approx([e["avg_activation"] for e in layer_1], rel=1e-5)
    # other layers into the same CSV: refused, since its revisions would count as complete
    other = run_labpipe(directory, ["dormancy", "--layers", "0", "--thresholds", "0,0.5"])
    assert other.returncode == 2 and "'layers': [1]" in other.stderr and "'layers': [0]" in other.stderr
    # listed in any order: analysed in layer order
    run_dormancy(_params(directory, repo_params, layers=[1, 0], output_csv="both.csv"))
    assert list(pd.read_csv("both.csv").layer_index) == [0, 1] * 3


@pytest.mark.parametrize(("flags", "message"), [
    (["--layers", "0,5,7"], "dormancy.layers: no layer 5, 7 in ckpt/step_00000010 (2 decoder layers: 0..1)"),
    (["--layers", "1,0,1"], "dormancy.layers lists layer 1 more than once"),
    (["--layers", "-1"], "dormancy.layers[0] must be >= 0, got -1"),
    (["--layers", "one"], "dormancy.layers[0] must be int, got str 'one'"),
    (["--profile", "missing.yaml"], "missing.yaml: no such file"),
    (["--profile", "typo.yaml"], "unknown key 'dormancy.modle'"),
])
def test_bad_layers_and_profiles_are_one_line(text_project, flags, message):
    directory, repo_params = text_project
    save_revisions(directory / "ckpt", "llama", steps=(10,))
    _params(directory, repo_params)
    (directory / "typo.yaml").write_text("dormancy:\n  modle: ckpt\n")
    done = run_labpipe(directory, ["dormancy", "--model", "ckpt", "--device", "cpu", *flags])
    assert done.returncode == 2 and "Traceback" not in done.stderr
    (line,) = [line for line in done.stderr.splitlines() if "error" in line]  # besides progress bars
    assert line.startswith("labpipe dormancy: error: ") and message in line, line


def test_hub_revisions_resolve_offline_from_a_local_cache(text_project, tmp_path):
    """from_pretrained(name, revision="step10"): the real hub path, served by a cache laid out like the hub's."""
    directory, repo_params = text_project
    cache = tmp_path / "hub"
    models = hub_cache(cache, "lab/tiny", "llama", (10, 20))
    _params(directory, repo_params, model="lab/tiny", revisions=["step10", "step20"])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    done = subprocess.run([sys.executable, "-m", "labpipe", "dormancy"], cwd=directory, capture_output=True,
                          text=True, env=env)
    assert done.returncode == 0, done.stderr
    results = pd.read_csv(directory / "artifacts/dormancy/results.csv")
    assert list(results.revision.unique()) == ["step10", "step20"] and list(results.step.unique()) == [10, 20]
    for step, model in models.items():  # each revision's own weights: step10 and step20 differ
        got = results[(results.step == step) & (results.threshold == 0.5)].sort_values("layer_index")
        expected = expected_rows(model, TEXTS, [0.5])
        assert list(got.num_dormant) == [e["num_dormant"] for e in expected]
        assert list(got.avg_activation) == pytest.approx([e["avg_activation"] for e in expected], rel=1e-5)
    assert results[results.step == 10].avg_activation.tolist() != results[results.step == 20].avg_activation.tolist()
    _params(directory, repo_params, model="lab/tiny", revisions=["step99"])
    missing = subprocess.run([sys.executable, "-m", "labpipe", "dormancy"], cwd=directory, capture_output=True,
                             text=True, env=env)
    assert missing.returncode == 2 and "revision 'step99'" in missing.stderr


def test_bad_inputs_are_clear_errors(text_project):
    directory, repo_params = text_project
    save_revisions(directory / "ckpt", "llama", steps=(10,))
    with pytest.raises(ValueError, match=r"revision 'step_00000099' not found in ckpt; available: step_00000010"):
        run_dormancy(_params(directory, repo_params, revisions=["step_00000099"]))
    Path("foreign.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match=r"foreign.csv has columns \['a', 'b'\].*refusing to append"):
        run_dormancy(_params(directory, repo_params, output_csv="foreign.csv"))
    assert Path("foreign.csv").read_text() == "a,b\n1,2\n"
    Path("empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="gave no text"):
        run_dormancy(_params(directory, repo_params, text_source=str(directory / "empty.txt")))
    with pytest.raises(ValueError, match=r"missing.txt: no such file"):
        run_dormancy(_params(directory, repo_params, text_source=str(directory / "missing.txt")))
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=16)).save_pretrained("gpt2/step_1")
    tokenizer().save_pretrained("gpt2/step_1")
    with pytest.raises(ValueError, match=r"no dormancy hook point for architecture 'gpt2'; known: gpt_neox, llama"):
        run_dormancy(_params(directory, repo_params, model="gpt2"))
