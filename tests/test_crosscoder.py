"""Crosscoder line: the loss of each penalty variant and its gradients, the init, and the metrics against hand
and numpy computations (the seed's epoch-0 counts rebuilt exactly, its per-token explained variance above both
sources, epoch sums over batches); the switching baseline against numpy's lstsq; the activation buffer (atomic
write, normalization, every row once per epoch with workers); the harvest from two tiny Llamas against their
forward pass; training on a planted dictionary; a run in epochs and its per-epoch records, through a stop and
resume; init_from; the champion's L0 band (the penalty x dec_init_norm sweep's report: test_report.py).
Kill-and-resume and the rest of the run lifecycle: test_lifecycle.py, with make_crosscoder_project."""

import copy
import json
import math
import pickle
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from conftest import write_params
from labpipe.checkpoint import SUPERSEDED, Checkpoints
from labpipe.cli import main as cli
from labpipe.config import CrosscoderParams, build, load_params
from labpipe.crosscoder.buffer import DATA, ActivationBuffer, BatchStream, ShuffledBatches, write_buffer
from labpipe.crosscoder.metrics import DeadLatents, Totals, median_norms, span_metrics, span_sums
from labpipe.crosscoder.model import Crosscoder, load_crosscoder
from labpipe.crosscoder.train import OUT_DIR, evaluate, l1_coef_at, lr_at
from labpipe.files import sha256_file


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: one intra-op thread is as fast, and immune to the other cores being busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- model: loss and init ----------------------------------------------------------------------------------


def _tiny_model() -> tuple[Crosscoder, torch.Tensor]:
    model = Crosscoder(d_a=1, d_b=2, dict_size=2)  # x = [a | b], a in R^1, b in R^2
    with torch.no_grad():
        model.W_enc.copy_(torch.tensor([[1.0, 0], [0, 1], [1, -1]]))
        model.b_enc.copy_(torch.tensor([0.0, -1]))
        model.W_dec.copy_(torch.tensor([[3.0, 0, 4], [0, 1, 0]]))
        model.b_dec.copy_(torch.tensor([0.0, 1, 0]))
    return model, torch.tensor([[1.0, 2, 0], [0, 1, 1]])


@pytest.mark.parametrize("variant", ["none", "detached", "full"])
def test_loss_and_its_gradients_match_a_hand_computation_for_each_penalty_variant(variant):
    model, x = _tiny_model()
    f, x_hat = model(x)
    # x W_enc + b_enc = [[1, 2-1], [1, 0-1]] -> f = [[1, 1], [1, 0]]
    assert f.tolist() == [[1, 1], [1, 0]]
    # x_hat = f W_dec + b_dec = [[3, 2, 4], [3, 1, 4]]; squared errors 4+0+16 = 20 and 9+0+9 = 18
    assert x_hat.tolist() == [[3, 2, 4], [3, 1, 4]]
    # ||W_dec,i^s||: latent 0: a |3| = 3, b |(0, 4)| = 4; latent 1: a 0, b 1
    assert model.decoder_norms().tolist() == [[3, 4], [0, 1]]
    terms = model.loss_terms(x, f, x_hat, l1_coef=0.5, decoder_norm_in_penalty=variant)
    # with the norms, w = (7, 1): penalty per row 1*7 + 1*1 = 8 and 1*7 = 7, mean 7.5; without, sum_i f_i: 2 and 1
    l1 = 1.5 if variant == "none" else 7.5
    assert (terms.mse.item(), terms.l1.item(), terms.loss.item()) == (19, l1, 19 + 0.5 * l1)

    terms.l1.backward()  # the penalty's gradients alone
    # d/d b_enc_i = mean over rows of w_i * [pre-activation > 0]; the gates are [[1, 1], [1, 0]]
    w = [1, 1] if variant == "none" else [7, 1]
    assert model.b_enc.grad.tolist() == [(w[0] + w[0]) / 2, w[1] / 2]
    # d/d W_dec,i^s = mean_t f_ti * W_dec,i^s / ||W_dec,i^s|| when the norms keep their gradient: mean f = (1, 0.5);
    # latent 0: a 3/3 = 1, b (0, 4)/4 = (0, 1); latent 1: a has norm 0 (subgradient 0), b (1, 0)/1 * 0.5
    decoder = [[1, 0, 1], [0, 0.5, 0]] if variant == "full" else [[0, 0, 0], [0, 0, 0]]
    assert (model.W_dec.grad if model.W_dec.grad is not None else torch.zeros(2, 3)).tolist() == decoder


def test_init_normalizes_decoder_rows_per_source_and_transposes_the_encoder():
    model = Crosscoder(d_a=5, d_b=7, dict_size=16)
    model.init_weights("kaiming", transpose_init=True, dec_init_norm=0.1, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model.decoder_norms(), torch.full((16, 2), 0.1))
    assert torch.equal(model.W_enc, model.W_dec.T)
    assert not model.b_enc.any() and not model.b_dec.any()

    again = Crosscoder(5, 7, 16)
    again.init_weights("kaiming", True, 0.1, torch.Generator().manual_seed(0))
    assert torch.equal(again.W_dec, model.W_dec)  # seeded

    raw = Crosscoder(5, 7, 16)
    raw.init_weights("kaiming", transpose_init=False, dec_init_norm=0, generator=torch.Generator().manual_seed(0))
    assert raw.W_dec.abs().max() <= math.sqrt(6 / 16) and raw.W_enc.abs().max() <= math.sqrt(6 / 12)
    assert not torch.allclose(raw.decoder_norms(), raw.decoder_norms()[0, 0])  # left as drawn
    assert not torch.equal(raw.W_enc, raw.W_dec.T)


# ---- metrics: by hand, against numpy, and the seed's log ---------------------------------------------------


def _metrics(x, f, x_hat, d_a, **kwargs) -> dict[str, float]:
    return span_metrics(span_sums(torch.as_tensor(x), torch.as_tensor(f), torch.as_tensor(x_hat), d_a, **kwargs))


SEED_NAMES = ["total_inactive", "mean_active", "mean_active_pct", "max_active", "max_active_pct", "min_active",
              "min_active_pct", "total_dead_neurons", "total_neurons", "pct_dead_neurons", "mean_explained_variance",
              "mean_explained_variance_a", "mean_explained_variance_b", "residual"]  # the seed's log line


def _span(x: np.ndarray, f: np.ndarray, x_hat: np.ndarray, d_a: int, centre: np.ndarray | None = None) -> dict:
    """The definitions of metrics.py's docstring over the rows of x, by numpy; centre: mu (default: x's mean)."""
    centre = x.mean(axis=0) if centre is None else centre
    r, v = (x - x_hat) ** 2, (x - centre) ** 2
    r_a, r_b, v_a, v_b = r[:, :d_a].sum(1), r[:, d_a:].sum(1), v[:, :d_a].sum(1), v[:, d_a:].sum(1)
    n_t, c_i = (f > 0).sum(axis=1), (f > 0).sum(axis=0)
    latents = f.shape[1]
    return {"mean_active": n_t.mean(), "mean_active_pct": n_t.mean() / latents, "max_active": n_t.max(),
            "max_active_pct": n_t.max() / latents, "min_active": n_t.min(), "min_active_pct": n_t.min() / latents,
            "total_inactive": (c_i == 0).sum(), "residual": (r_a + r_b).mean(),
            "mean_explained_variance": (1 - (r_a + r_b) / (v_a + v_b)).mean(),
            "mean_explained_variance_a": (1 - r_a / v_a).mean(), "mean_explained_variance_b": (1 - r_b / v_b).mean(),
            "explained_variance": 1 - (r_a + r_b).sum() / (v_a + v_b).sum(),
            "explained_variance_a": 1 - r_a.sum() / v_a.sum(), "explained_variance_b": 1 - r_b.sum() / v_b.sum(),
            "mse_a": r_a.mean(), "mse_b": r_b.mean(), "l0": n_t.mean(), "max_firing_rate": c_i.max() / len(x),
            "min_firing_rate": c_i.min() / len(x), "inactive_tokens": (n_t == 0).sum()}


def test_the_seeds_epoch_0_line_is_per_token_counts_over_its_4096_token_batch():
    """A batch of 4096 tokens over 12288 latents whose per-token counts are those of the seed's epoch 0 line:
    its mean_active = 2570169 / 4096, max_active 4927, min_active 0, and the pcts divided by 12288."""
    counts = np.array([4927, 0] + [627] * 2398 + [626] * 1696)
    assert counts.sum() == 2570169 and len(counts) == 4096
    f = torch.from_numpy(np.arange(12288)[None, :] < counts[:, None]).to(torch.uint8)  # latent i < n_t fires
    x = torch.randn(4096, 4)
    got = _metrics(x, f, x, 2)
    seed = {'mean_active': 627.482666015625, 'mean_active_pct': 0.05106467008590698, 'max_active': 4927,
            'max_active_pct': 0.4009602864583333, 'min_active': 0, 'min_active_pct': 0.0}
    assert {name: got[name] for name in seed} == seed
    assert got["l0"] == got["mean_active"] and got["inactive_tokens"] == 1  # the token that activates none
    # per latent: latent 0 fires on 4095 tokens, latents 4927.. on none: total_inactive over this one-batch span
    assert got["max_firing_rate"] == 4095 / 4096 and got["min_firing_rate"] == 0
    assert got["total_inactive"] == 12288 - 4927


def test_mean_explained_variance_is_per_token_and_can_exceed_both_sources_as_in_the_seeds_log():
    # one dimension per source, the batch mean 0: spreads v^a = (4, 4, 1, 1), v^b = (1, 1, 4, 4); tokens 0, 1
    # reconstruct a exactly and miss b by 1, tokens 2, 3 the other way round
    x = torch.tensor([[2.0, 1], [-2, -1], [1, 2], [-1, -2]])
    x_hat = torch.tensor([[2.0, 0], [-2, 0], [0, 2], [0, -2]])
    got = _metrics(x, torch.ones(4, 3), x_hat, 1)
    # per token: EV_a = (1, 1, 0, 0), EV_b = (0, 0, 1, 1), joint 1 - 1/5 = 0.8 each
    assert (got["mean_explained_variance_a"], got["mean_explained_variance_b"]) == (0.5, 0.5)
    assert got["mean_explained_variance"] == pytest.approx(0.8)
    # pooled: 1 - 2/10 for each source, 1 - 4/20 for both; residual = mean_t (r^a + r^b) = 1
    assert [got[f"explained_variance{s}"] for s in ("", "_a", "_b")] == pytest.approx([0.8, 0.8, 0.8])
    assert (got["residual"], got["mse_a"], got["mse_b"]) == (1, 0.5, 0.5)


def test_span_metrics_match_numpy_for_a_batch_and_for_an_epoch_of_batches():
    rng = np.random.default_rng(0)
    d_a, d_b, latents = 3, 5, 10
    batches = []
    for rows in (64, 40, 64):
        x = rng.normal(size=(rows, d_a + d_b)) * [1, 2, 3, 1, 1, 1, 4, 1] + 2
        f = np.maximum(rng.normal(size=(rows, latents)) - 1, 0)
        f[:, 3] = 0  # a latent that never fires
        f[7] = 0  # a token on which no latent fires
        batches.append((x, f, x + rng.normal(size=x.shape) * 0.5))
    batches[1][1][:, 5] = 0  # latent 5 is silent in batch 1 only

    def expected(spans) -> dict[str, float]:  # each batch centred on its own mean
        x, f, x_hat = (np.concatenate(part) for part in zip(*spans, strict=True))
        return _span(x, f, x_hat, d_a, np.concatenate([np.broadcast_to(b[0].mean(axis=0), b[0].shape) for b in spans]))

    tensors = [tuple(torch.tensor(a) for a in batch) for batch in batches]
    batch = _metrics(*tensors[1], d_a)
    assert batch == pytest.approx(expected(batches[1:2]), rel=1e-12) and batch["total_inactive"] == 2
    epoch = Totals()
    for x, f, x_hat in tensors:
        epoch.add(span_sums(x, f, x_hat, d_a))
    saved = epoch.state_dict()
    assert span_metrics(epoch.sums) == pytest.approx(expected(batches), rel=1e-12)
    assert span_metrics(epoch.sums)["total_inactive"] == 1  # latent 5 fired in the other batches
    resumed = Totals()
    resumed.load_state_dict(pickle.loads(pickle.dumps(saved)))
    assert span_metrics(resumed.sums) == span_metrics(epoch.sums)

    x, f, x_hat = batches[0]
    norms = median_norms(tensors[0][0], tensors[0][2])
    assert norms == pytest.approx({"median_input_norm": np.median(np.linalg.norm(x, axis=1)),
                                   "median_error_norm": np.median(np.linalg.norm(x - x_hat, axis=1))}, rel=1e-12)
    assert len(x) % 2 == 0  # an even count: numpy's median averages the middle two


def test_dead_latents_match_a_direct_count_over_the_window():
    rng = np.random.default_rng(1)
    latents, window = 12, 50
    sizes = [16, 7, 16, 30, 5, 16, 16, 9]
    firing_rate = np.linspace(0, 0.3, latents)  # latent 0 never fires, the last ones nearly always
    batches = [np.maximum(rng.random((n, latents)) - (1 - firing_rate), 0) for n in sizes]
    batches[2][:, 5] = 1.0  # latent 5 fires in batch 2 only
    for b in batches[3:]:
        b[:, 5] = 0
    tracker = DeadLatents(latents, window)
    for k, f in enumerate(batches):
        tracker.update(torch.tensor(f))
        # direct: tokens in the batches after the last one in which the latent fired (all tokens if never)
        seen = np.cumsum(sizes[: k + 1])
        expected = []
        for i in range(latents):
            fired = [j for j in range(k + 1) if (batches[j][:, i] > 0).any()]
            silent = seen[-1] - (seen[fired[-1]] if fired else 0)
            expected.append(silent >= window)
        assert tracker.dead().tolist() == expected, k
    assert tracker.dead()[0] and tracker.dead()[5] and not tracker.dead()[-1]
    assert tracker.metrics() == {"total_dead_neurons": sum(expected), "total_neurons": latents,
                                 "pct_dead_neurons": sum(expected) / latents}


def test_lr_warms_up_holds_and_decays_to_zero_and_lambda_warms_up(repo_params):
    c = build(CrosscoderParams, {**repo_params["crosscoder"], "lr": 1.0, "lr_warmup_steps": 10, "steps": 100,
                        "lr_decay_start": 0.8, "l1_coef": 2.0, "l1_warmup_steps": 20}, where="test")
    assert [lr_at(c, t) for t in (0, 4, 9, 50, 80, 90, 99)] == pytest.approx([0.1, 0.5, 1, 1, 1, 0.5, 0.05])
    assert [l1_coef_at(c, t) for t in (0, 5, 20, 90)] == pytest.approx([0, 0.5, 2, 2])


# ---- the buffer ---------------------------------------------------------------------------------------------


def _write(directory: Path, x: np.ndarray, d_a: int, dtype: str = "float16", chunk: int = 300) -> ActivationBuffer:
    chunks = ((torch.from_numpy(x[i : i + chunk, :d_a]), torch.from_numpy(x[i : i + chunk, d_a:]))
              for i in range(0, len(x), chunk))
    write_buffer(directory, chunks, len(x), d_a, x.shape[1] - d_a, dtype, {"test": True})
    return ActivationBuffer.open(directory)


def _indexed_rows(rows: int, d_a: int = 2, d_b: int = 3) -> np.ndarray:
    """Row i holds i in its first column (exact in float16 up to 2048) and ones elsewhere."""
    x = np.ones((rows, d_a + d_b), dtype=np.float32)
    x[:, 0] = np.arange(rows)
    return x


@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_epoch_visits_every_row_exactly_once(tmp_path, num_workers):
    buffer = _write(tmp_path / "buffer", _indexed_rows(1000), d_a=2)
    batch, per_epoch = 96, 11  # ten full batches and a last one of 40 rows

    def rows_of(stream) -> list[np.ndarray]:
        return [np.rint(x[:, 0].numpy() / buffer.scales[0]).astype(int) for x in stream]

    with BatchStream(buffer, batch, seed=3, start=0, stop=2 * per_epoch + 3, num_workers=num_workers) as stream:
        batches = rows_of(stream)
    assert [len(b) for b in batches] == [96] * 10 + [40] + [96] * 10 + [40] + [96] * 3
    for epoch in (0, 1):
        visited = np.concatenate(batches[epoch * per_epoch : (epoch + 1) * per_epoch])
        np.testing.assert_array_equal(np.sort(visited), np.arange(1000))
    assert not np.array_equal(batches[0], batches[per_epoch])  # each epoch has its own order

    with BatchStream(buffer, batch, seed=3, start=13, stop=16, num_workers=num_workers) as stream:
        resumed = rows_of(stream)  # a run resumed at step 13 gets the batches an uninterrupted one does
    for got, expected in zip(resumed, batches[13:16], strict=True):
        np.testing.assert_array_equal(got, expected)
    with BatchStream(buffer, batch, seed=4, start=0, stop=1) as stream:
        assert not np.array_equal(rows_of(stream)[0], batches[0])


def test_workers_get_the_file_not_a_copy_of_the_rows(tmp_path):
    buffer = _write(tmp_path / "buffer", np.random.default_rng(0).normal(size=(20000, 16)).astype(np.float32), 8)
    dataset = ShuffledBatches(buffer, batch_size=64, seed=0)
    dataset[0]  # the memmap and epoch 0's permutation are now open in this process
    assert (buffer.directory / DATA).stat().st_size == 640000
    assert len(pickle.dumps(dataset)) < 4000  # what a spawned worker receives: the path and the metadata


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_rows_are_normalized_to_mean_norm_sqrt_d_per_source(tmp_path, dtype):
    rng = np.random.default_rng(2)
    d_a, d_b = 6, 10
    x = np.concatenate([rng.normal(size=(700, d_a)) * 30 + 5, rng.normal(size=(700, d_b)) * 0.01], axis=1)
    buffer = _write(tmp_path / "buffer", x.astype(np.float32), d_a, dtype)
    stored = torch.from_numpy(np.array(buffer.array()).view(np.int16)).view(getattr(torch, dtype))
    assert torch.equal(stored, torch.from_numpy(x).float().to(getattr(torch, dtype)))  # bf16 as its bit patterns
    with BatchStream(buffer, 128, seed=0, start=0, stop=6) as stream:  # one epoch: 700 rows
        batches = list(stream)
    dataset = ShuffledBatches(buffer, 128, seed=0)
    for index, batch in enumerate(batches):  # numpy's conversion (the CPU path) is torch's, bit for bit
        raw = dataset[index].view(getattr(torch, dtype))
        assert torch.equal(batch, raw.float() * buffer.scale_vector())
    rows = torch.cat(batches)
    assert len(rows) == 700
    assert rows[:, :d_a].norm(dim=1).mean().item() == pytest.approx(math.sqrt(d_a), rel=1e-5)
    assert rows[:, d_a:].norm(dim=1).mean().item() == pytest.approx(math.sqrt(d_b), rel=1e-5)
    assert buffer.meta["sha256"] == sha256_file(buffer.directory / DATA)


def test_a_failed_write_leaves_the_previous_buffer_and_no_partial_one(tmp_path):
    directory = tmp_path / "buffer"
    old = _write(directory, _indexed_rows(100), 2)

    def chunks():
        yield torch.ones(50, 2), torch.ones(50, 3)
        raise KeyboardInterrupt  # killed mid-harvest

    with pytest.raises(KeyboardInterrupt):
        write_buffer(directory, chunks(), 100, 2, 3, "float16", {})
    assert ActivationBuffer.open(directory).meta == old.meta
    assert sorted(p.name for p in tmp_path.iterdir()) == ["buffer"]  # no temp directory left either
    with pytest.raises(ValueError, match="overflow float16, use buffer_dtype=bfloat16"):
        write_buffer(tmp_path / "big", [(torch.full((4, 2), 7e4), torch.ones(4, 3))], 4, 2, 3, "float16", {})
    assert not (tmp_path / "big").exists()
    with pytest.raises(ValueError, match="no activation buffer at .*run the activations stage first"):
        ActivationBuffer.open(tmp_path / "big")


# ---- the harvest from two tiny Llamas -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llamas(tmp_path_factory) -> dict[str, Path]:
    """Two Llamas of different widths (16 and 24), built from configs and saved like lm_train's checkpoints."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("models")
    paths = {}
    for name, width in (("a", 16), ("b", 24)):
        torch.manual_seed(len(name) + width)
        config = LlamaConfig(vocab_size=32, hidden_size=width, intermediate_size=32, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
        LlamaForCausalLM(config).save_pretrained(root / name)
        paths[name] = root / name
    return paths


def _synth_manifest(directory: Path, sequences: int = 8, seq_length: int = 16) -> np.ndarray:
    """Two train shards (and a val shard) of random token ids under the manifest's contract; the train tokens."""
    from labpipe.synth.manifest import MANIFEST, Shard, write_manifest

    rng = np.random.default_rng(5)
    out_dir = directory / "shards"
    out_dir.mkdir()
    shards, train = [], []
    for split, index in (("train", 0), ("train", 1), ("val", 0)):
        tokens = rng.integers(0, 32, size=(sequences, seq_length)).astype("<u2")
        file = f"{split}_{index:05d}.bin"
        tokens.tofile(out_dir / file)
        shards.append(Shard(split, index, file, tokens.size, sequences, sha256_file(out_dir / file), index, ()))
        if split == "train":
            train.append(tokens)
    write_manifest(MANIFEST, {"dtype": "<u2", "vocab_size": 32, "seq_length": seq_length,
                              "sequences_per_shard": sequences, "start": "stationary", "permute_emissions": False,
                              "block_sequences": sequences, "hmm": {}, "out_dir": str(out_dir)}, shards)
    return np.concatenate(train)


def _residual_by_hook(path: Path, ids: np.ndarray, layer: int) -> torch.Tensor:
    """The output of decoder layer `layer`, caught by a forward hook: the residual stream after it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path).float().eval()
    caught = []
    model.model.layers[layer].register_forward_hook(lambda m, i, out: caught.append(out[0] if isinstance(
        out, tuple) else out))
    with torch.no_grad():
        model(torch.from_numpy(ids.astype(np.int64)))
    return caught[0].flatten(0, 1)


def _crosscoder_params(directory: Path, repo_params: dict, **crosscoder) -> None:
    write_params(directory, {**repo_params, "crosscoder": {**repo_params["crosscoder"], "device": "cpu",
                                                           **crosscoder}})


def test_harvest_stores_both_residual_streams_on_the_same_tokens(project, tiny_llamas, capsys):
    directory, repo_params = project
    train = _synth_manifest(directory)
    # layer_a = 1 is the last layer: without tie_last_hidden_states = False it would be the final norm's output
    _crosscoder_params(directory, repo_params, source_a=str(tiny_llamas["a"]), source_b=str(tiny_llamas["b"]),
                       layer_a=1, layer_b=0, buffer_tokens=200, buffer_dir="buffer")
    params = load_params("params.yaml")
    (directory / ".buffer.x1y2.tmp").mkdir()  # the temp directory of a harvest that was SIGKILLed
    assert cli(["activations"]) == 0
    assert not (directory / ".buffer.x1y2.tmp").exists()
    buffer = ActivationBuffer.open("buffer")
    assert (buffer.rows, buffer.d_a, buffer.d_b, buffer.dtype) == (200, 16, 24, "float16")
    inputs = buffer.meta["inputs"]
    assert inputs["source_a"] == {"name": str(tiny_llamas["a"]), "layer": 1,
                                  "sha256": inputs["source_a"]["sha256"]} and inputs["tokens"]["text_source"] == "synth"
    assert buffer.meta["sha256"] == sha256_file(buffer.directory / DATA)

    stored = torch.from_numpy(buffer.array().astype(np.float32))  # raw, unscaled
    ids = train[:13]  # 200 tokens: 12 whole sequences of 16 and half of the 13th
    expected_a = _residual_by_hook(tiny_llamas["a"], ids, 1)[:200]
    expected_b = _residual_by_hook(tiny_llamas["b"], ids, 0)[:200]
    torch.testing.assert_close(stored[:, :16], expected_a, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(stored[:, 16:], expected_b, rtol=2e-3, atol=2e-3)
    norms = [stored[:, :16].norm(dim=1).mean().item(), stored[:, 16:].norm(dim=1).mean().item()]
    assert buffer.scales == pytest.approx([4 / norms[0], math.sqrt(24) / norms[1]], rel=1e-5)

    capsys.readouterr()
    before = (buffer.directory / DATA).stat().st_mtime_ns
    from labpipe.crosscoder.buffer import run_activations

    run_activations(params)  # harvested once: same sources and tokens -> nothing to do
    assert "up to date" in capsys.readouterr().out
    assert (buffer.directory / DATA).stat().st_mtime_ns == before
    run = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("crosscoders").experiment_id])[0]
    assert run.data.tags["labpipe.stage"] == "activations" and run.data.metrics["rows"] == 200


def test_a_missing_source_is_a_clear_error(project, capsys):
    directory, repo_params = project
    _crosscoder_params(directory, repo_params, source_a="artifacts/lm/checkpoints/step_00000100")
    assert cli(["activations"]) == 2
    assert "neither a local save_pretrained directory nor a reachable hub model" in capsys.readouterr().err


def test_harvest_from_a_text_file_with_the_sources_tokenizer(project, tiny_llamas, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    directory, repo_params = project
    words = ["<eos>", "<unk>", *"the dog cat ran sat big red sun and a on mat".split()]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", unk_token="<unk>")
    sources = {}
    for name in ("a", "b"):  # copies of the models, each with the tokenizer saved beside it
        sources[name] = tmp_path / name
        shutil.copytree(tiny_llamas[name], sources[name])
        tokenizer.save_pretrained(sources[name])
    stories = ["the dog ran and the cat sat on a mat " * 8, "a big red sun sat on the dog " * 10]  # 154 tokens
    (directory / "stories.txt").write_text("".join(f"{s}\n<|endoftext|>\n" for s in stories))
    _crosscoder_params(directory, repo_params, source_a=str(sources["a"]), source_b=str(sources["b"]),
                       layer_a=0, layer_b=1, text_source="stories.txt", buffer_tokens=70, buffer_dir="buffer")
    assert cli(["activations"]) == 0

    buffer = ActivationBuffer.open("buffer")
    stream = [i for s in stories for i in [*tokenizer(s.strip())["input_ids"], 0]]
    ids = np.array(stream[:128]).reshape(2, 64)  # context = min(128, max_position_embeddings 64)
    stored = torch.from_numpy(buffer.array().astype(np.float32))
    torch.testing.assert_close(stored[:, :16], _residual_by_hook(sources["a"], ids, 0)[:70], rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(stored[:, 16:], _residual_by_hook(sources["b"], ids, 1)[:70], rtol=2e-3, atol=2e-3)
    assert buffer.meta["inputs"]["tokens"]["sha256"] == sha256_file(directory / "stories.txt")


# ---- training --------------------------------------------------------------------------------------------------


def _planted(rows: int, d_a: int, d_b: int, n_true: int, active: float, seed: int = 0):
    """Rows that are sparse sums of n_true unit directions of R^(d_a + d_b): about `active` per row, with
    coefficients in [1, 2]. Returns the rows and the directions."""
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(n_true, d_a + d_b))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    coefficients = (rng.random((rows, n_true)) < active / n_true) * rng.uniform(1, 2, size=(rows, n_true))
    return (coefficients @ directions).astype(np.float32), directions


PLANTED = {"dict_size": 32, "l1_coef": 0.1, "l1_warmup_steps": 50, "lr": 0.01, "lr_warmup_steps": 20,
           "lr_decay_start": 0.8, "batch_size": 256, "dec_init_norm": 0.1, "buffer_dir": "buffer"}


def test_training_recovers_a_planted_dictionary_and_registers_a_champion(project):
    directory, repo_params = project
    d_a, d_b = 12, 20
    x, directions = _planted(8192, d_a, d_b, n_true=24, active=5)
    buffer = _write(directory / "buffer", x, d_a)
    _crosscoder_params(directory, repo_params, **PLANTED, steps=500, log_every=50, checkpoint_every=250,
                       dead_window=4096)
    assert cli(["crosscoder-train"]) == 0

    model, saved = load_crosscoder(OUT_DIR / "model.pt")
    assert saved["config"] == {"d_a": d_a, "d_b": d_b, "dict_size": 32} and saved["scales"] == list(buffer.scales)
    # in the normalized space the loader feeds, a direction u is [s_a u^a, s_b u^b]
    scaled = directions * buffer.scale_vector().numpy()
    scaled /= np.linalg.norm(scaled, axis=1, keepdims=True)
    decoder = model.W_dec.detach().numpy()
    decoder = decoder / np.linalg.norm(decoder, axis=1, keepdims=True)
    best_cosine = (scaled @ decoder.T).max(axis=1)
    assert (best_cosine > 0.9).sum() >= 22, np.sort(best_cosine)

    metrics = json.loads((OUT_DIR / "metrics.json").read_text())
    assert metrics["eval_rows"] == 8192 and metrics["in_l0_band"]
    assert metrics["l0_band"] == [4.0, 64.0] and metrics["steps"] == 500
    rows = buffer.to_float(torch.from_numpy(np.array(buffer.array()).view(np.int16)), buffer.scale_vector())
    with torch.no_grad():
        f, x_hat = (t.double().numpy() for t in model(rows))
    expected = _span(rows.double().numpy(), f, x_hat, d_a)  # over the whole buffer, centred on its mean, by numpy
    assert {name: metrics[name] for name in expected} == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert metrics["mean_explained_variance"] > 0.9 and 4 <= metrics["l0"] <= 10
    assert (metrics["median_input_norm"], metrics["median_error_norm"]) == pytest.approx(
        (np.median(np.linalg.norm(rows.numpy(), axis=1)), np.median(np.linalg.norm(rows.numpy() - x_hat, axis=1))),
        rel=1e-5)
    assert "switch_identity_mse_b" not in metrics  # d_a != d_b: no identity baseline
    assert metrics["beats_switch_linear"] == (metrics["explained_variance_b"]
                                              > metrics["switch_linear_explained_variance_b"])
    history = pd.read_csv(OUT_DIR / "history.csv")
    assert list(history.step) == list(range(50, 501, 50))
    assert set(SEED_NAMES + ["loss", "l1", "l0", "lr", "lambda", "grad_norm", "explained_variance_b", "mse_b",
                             "median_input_norm", "median_error_norm"]) <= set(history.columns)
    epochs = pd.read_csv(OUT_DIR / "epochs.csv")  # 32 batches an epoch: 15 epochs and 20 steps of a 16th
    assert list(epochs.epoch) == list(range(16)) and list(epochs.step) == [*range(32, 481, 32), 500]
    assert set(SEED_NAMES) <= set(epochs.columns)
    assert (OUT_DIR / "plots" / "training.png").stat().st_size > 0
    assert [p.name for p in Checkpoints(OUT_DIR / "checkpoints", "step").all()] == [  # keep_checkpoints: 2
        "step_00000250.pt", "step_00000500.pt"]
    assert sorted(p.name for p in OUT_DIR.iterdir()) == ["checkpoints", "epochs.csv", "history.csv", "metrics.json",
                                                         "model.pt", "plots"]  # nothing staged left, no lock

    client = MlflowClient()
    champion = client.get_model_version_by_alias("crosscoder", "champion")
    run = client.get_run(champion.run_id)
    assert run.data.tags["labpipe.stage"] == "crosscoder_train"
    assert {m.step for m in client.get_metric_history(run.info.run_id, "mean_explained_variance")} == set(
        range(50, 501, 50))
    assert {m.step for m in client.get_metric_history(run.info.run_id, "epoch_mean_explained_variance")} == set(
        epochs.step)
    assert set(SEED_NAMES) <= set(run.data.metrics)
    assert run.data.metrics["final_mean_explained_variance"] == pytest.approx(metrics["mean_explained_variance"])
    assert float(champion.tags["metric.mean_explained_variance"]) == pytest.approx(metrics["mean_explained_variance"])
    assert champion.tags["metric_revision"] == "2"  # the per-token mean: champions of (EV_a + EV_b) / 2 are replaced


def test_the_switching_baseline_is_numpys_least_squares_map_and_the_identity(tmp_path, repo_params):
    rng = np.random.default_rng(3)
    d = 6
    a = rng.normal(size=(3000, d)) * rng.uniform(0.5, 2, d) + rng.normal(size=d)
    b = a @ rng.normal(size=(d, d)) * 0.5 + 1.5 * a + rng.normal(size=(3000, d)) * 0.3 + 4
    buffer = _write(tmp_path / "buffer", np.concatenate([a, b], axis=1).astype(np.float32), d)
    model = Crosscoder(d, d, 16)
    model.init_weights("kaiming", True, 0.1, torch.Generator().manual_seed(0))
    c = build(CrosscoderParams, {**repo_params["crosscoder"], "eval_rows": 5000, "batch_size": 128}, where="test")
    final = evaluate(model, buffer, c, torch.device("cpu"))  # every row, in 24 chunks

    rows = buffer.to_float(torch.from_numpy(np.array(buffer.array()).view(np.int16)), buffer.scale_vector())
    x = rows.double().numpy()
    x_a, x_b = x[:, :d], x[:, d:]
    design = np.concatenate([x_a, np.ones((len(x), 1))], axis=1)  # the affine map: a column of ones
    solution = np.linalg.lstsq(design, x_b, rcond=None)[0]
    predictions = {"linear": design @ solution, "identity": x_a * buffer.scales[1] / buffer.scales[0]}
    for name, b_hat in predictions.items():
        expected = _span(x, np.ones((len(x), 1)), np.concatenate([x_a, b_hat], axis=1), d)
        for metric in ("explained_variance_b", "mean_explained_variance_b", "mse_b"):
            assert final[f"switch_{name}_{metric}"] == pytest.approx(expected[metric], rel=1e-5), (name, metric)
    assert final["switch_linear_explained_variance_b"] > 0.9 > final["switch_identity_explained_variance_b"]
    with torch.no_grad():
        f, x_hat = (t.double().numpy() for t in model(rows))
    expected = _span(x, f, x_hat, d)
    assert {name: final[name] for name in expected} == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert final["eval_rows"] == 3000 and final["beats_switch_linear"] is False  # an untrained crosscoder


def test_training_without_a_buffer_is_a_clear_error(project, capsys):
    directory, repo_params = project
    _crosscoder_params(directory, repo_params, buffer_dir="nowhere")
    assert cli(["crosscoder-train"]) == 2
    assert "no activation buffer at nowhere: run the activations stage first" in capsys.readouterr().err


def make_crosscoder_project(directory: Path, repo_params: dict, **crosscoder_overrides) -> None:
    """A project in `directory` that `python -m labpipe crosscoder-train` trains in a few seconds: an activation
    buffer of planted sparse rows written directly (no harvest) and params.yaml with tiny sizes, 40 steps, a
    checkpoint every 5, all kept, then `crosscoder_overrides`. Every L0 is a champion candidate (the band is
    [0, dict_size]). MLflow: $MLFLOW_TRACKING_URI. The cwd is left as it was (absolute paths only)."""
    x, _ = _planted(8192, 32, 32, n_true=48, active=4)
    _write(directory / "buffer", x, 32)
    params = copy.deepcopy(repo_params)
    params["crosscoder"].update({
        **PLANTED, "dict_size": 256, "batch_size": 512, "l1_warmup_steps": 10, "lr_warmup_steps": 5,
        "dead_window": 4096, "eval_rows": 4096, "champion_l0_min": 0.0, "steps": 40,
        "checkpoint_every": 5, "keep_checkpoints": 100, "log_every": 5, "num_workers": 0, "device": "cpu",
        "champion_l0_max": float(crosscoder_overrides.get("dict_size", 256)), **crosscoder_overrides})
    write_params(directory, params)


def _run_of(directory: Path) -> str:
    """The MLflow run id in the newest checkpoint."""
    newest = Checkpoints(directory / OUT_DIR / "checkpoints", "step").all()[-1]
    return torch.load(newest, weights_only=False)["state"]["run_id"]


def test_init_from_a_previous_model_starts_from_exactly_its_weights(project, monkeypatch, capsys):
    import labpipe.crosscoder.train as train

    directory, repo_params = project
    make_crosscoder_project(directory, repo_params, steps=10, dict_size=64, batch_size=256)
    real, starts = train.train_step, []  # the weights each run's first update starts from

    def train_step(model, optimizer, x, lr, l1_coef, c):
        if not optimizer.state:  # Adam has not stepped yet: the first update of a run
            starts.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return real(model, optimizer, x, lr, l1_coef, c)

    def run(*sets: str) -> dict:
        assert cli(["crosscoder-train", *(f"--set={s}" for s in sets)]) == 0
        return torch.load(OUT_DIR / "model.pt", weights_only=False)

    monkeypatch.setattr(train, "train_step", train_step)
    previous = run()
    previous_run = _run_of(directory)
    source = "previous.pt"  # a copy: an init_from inside the run's own output folder is refused
    shutil.copy(OUT_DIR / "model.pt", source)
    started = run(f"crosscoder.init_from={source}")
    assert len(starts) == 2
    scratch, initial = starts
    assert set(initial) == set(previous["model"])
    for name, tensor in previous["model"].items():
        assert torch.equal(initial[name], tensor), name  # exactly the previous run's final weights
        assert not torch.equal(scratch[name], tensor), name  # which the seeded init is not
    assert not all(torch.equal(started["model"][k], v) for k, v in previous["model"].items())  # and it trained
    assert "moved to" in capsys.readouterr().err  # the init weights are part of the fingerprint: a new trajectory

    client = MlflowClient()
    run_id = _run_of(directory)
    assert run_id != previous_run
    assert client.get_run(run_id).data.tags["labpipe.init_from"] == source
    assert client.get_run(run_id).data.params["crosscoder.init_from"] == source
    assert "labpipe.init_from" not in client.get_run(previous_run).data.tags
    assert list(pd.read_csv(OUT_DIR / "history.csv").step) == [5, 10]  # all its steps, from step 1

    torch.save({"model": Crosscoder(32, 32, 16).state_dict()}, "small.pt")
    assert cli(["crosscoder-train", "--set=crosscoder.init_from=small.pt"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "crosscoder.init_from=small.pt: the weights do not fit the model" in error and "size mismatch" in error


def test_a_run_outside_the_l0_band_is_not_registered_and_a_finished_run_reruns_with_zero_steps(project, capsys):
    directory, repo_params = project
    make_crosscoder_project(directory, repo_params, steps=10, dict_size=64, batch_size=256,
                            champion_l0_min=60.0, champion_l0_max=64.0)
    assert cli(["crosscoder-train"]) == 0
    out = capsys.readouterr().out
    metrics = json.loads((OUT_DIR / "metrics.json").read_text())
    assert metrics["l0"] < 60 and not metrics["in_l0_band"] and metrics["l0_band"] == [60.0, 64.0]
    assert "not a champion candidate" in out and "final: mean explained variance" in out
    client = MlflowClient()
    assert client.search_registered_models() == []
    run_id = _run_of(directory)
    assert client.get_run(run_id).data.tags["champion"] == "False"
    weights, history = torch.load(OUT_DIR / "model.pt")["model"], pd.read_csv(OUT_DIR / "history.csv")

    # the band is not part of the trajectory: the finished run is resumed, has no step left, and is a candidate now
    assert cli(["crosscoder-train", "--set=crosscoder.champion_l0_min=0", "--set=crosscoder.champion_l0_max=64"]) == 0
    out = capsys.readouterr().out
    assert "resuming from artifacts/crosscoder/checkpoints/step_00000010.pt (step 10)" in out
    assert "registered crosscoder v1 as champion" in out
    for name, tensor in torch.load(OUT_DIR / "model.pt")["model"].items():  # nothing trained: the same weights
        assert torch.equal(tensor, weights[name]), name
    pd.testing.assert_frame_equal(pd.read_csv(OUT_DIR / "history.csv"), history)
    assert json.loads((OUT_DIR / "metrics.json").read_text())["in_l0_band"]
    assert _run_of(directory) == run_id
    run = client.get_run(run_id)
    assert run.data.tags["champion"] == "True" and run.data.tags["labpipe.changed.crosscoder.champion_l0_min"] == (
        "60.0 -> 0.0")
    assert client.get_model_version_by_alias("crosscoder", "champion").run_id == run_id
    assert not (OUT_DIR / "checkpoints" / SUPERSEDED).exists()


def test_a_run_in_epochs_logs_each_epoch_over_all_its_tokens(project, monkeypatch, capsys):
    import labpipe.crosscoder.train as train

    directory, repo_params = project
    # 8192 rows in batches of 768: 11 batches an epoch, the last of 512 rows
    make_crosscoder_project(directory, repo_params, steps=0, epochs=2, dict_size=64, batch_size=768)
    real, seen = train.train_step, []  # every step's batch, latents, reconstruction and loss

    def train_step(model, optimizer, x, lr, l1_coef, c):
        f, x_hat, terms, grad_norm = real(model, optimizer, x, lr, l1_coef, c)
        seen.append((x.double().numpy(), f.double().numpy(), x_hat.double().numpy(), terms.loss.item(), lr))
        return f, x_hat, terms, grad_norm

    monkeypatch.setattr(train, "train_step", train_step)
    assert cli(["crosscoder-train"]) == 0
    assert len(seen) == 22 and [len(s[0]) for s in seen[:11]] == [768] * 10 + [512]
    assert seen[-1][4] == pytest.approx(0.01 / 5)  # the lr decays to 0 at step 22: (22 - 21) / (22 - 17)
    epochs = pd.read_csv(OUT_DIR / "epochs.csv")
    assert list(epochs.epoch) == [0, 1] and list(epochs.step) == [11, 22]
    for row, steps in zip(epochs.to_dict("records"), (seen[:11], seen[11:]), strict=True):
        x, f, x_hat = (np.concatenate(part) for part in zip(*[s[:3] for s in steps], strict=True))
        centres = np.concatenate([np.broadcast_to(s[0].mean(axis=0), s[0].shape) for s in steps])
        expected = _span(x, f, x_hat, 32, centres)  # each token centred on its batch's mean
        assert {name: row[name] for name in expected} == pytest.approx(expected, rel=1e-5, abs=1e-6)
        assert row["loss"] == pytest.approx(sum(s[3] * len(s[0]) for s in steps) / len(x), rel=1e-5)
    out = capsys.readouterr().out
    assert "Epoch 0 (steps to 11): mean_active " in out and "Epoch 1 (steps to 22)" in out
    history = pd.read_csv(OUT_DIR / "history.csv")
    assert list(history.step) == [5, 10, 15, 20, 22] and history.epoch.iloc[-1] == 2
    for step, total_inactive in zip(history.step, history.total_inactive, strict=True):  # over the epoch so far
        first = (step - 1) // 11 * 11
        fired = np.concatenate([s[1] for s in seen[first:step]]).max(axis=0) > 0
        assert total_inactive == (~fired).sum(), step

    client = MlflowClient()
    run_id = _run_of(directory)
    params = client.get_run(run_id).data.params
    assert (params["crosscoder.steps"], params["crosscoder.epochs"]) == ("22", "0")  # the length in steps
    assert {m.step for m in client.get_metric_history(run_id, "epoch_total_inactive")} == {11, 22}
    # the same length given in steps is the same run, finished
    assert cli(["crosscoder-train", "--set=crosscoder.steps=22", "--set=crosscoder.epochs=0"]) == 0
    assert "resuming from artifacts/crosscoder/checkpoints/step_00000022.pt (step 22)" in capsys.readouterr().out
    assert _run_of(directory) == run_id


def test_a_run_stopped_inside_an_epoch_resumes_to_the_same_records(tmp_path, mlflow_store, repo_params, monkeypatch):
    import labpipe.crosscoder.train as train

    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    for directory in (straight, stopped):  # 16 batches an epoch, 40 steps, a checkpoint every 5
        directory.mkdir()
        make_crosscoder_project(directory, repo_params)
    monkeypatch.chdir(straight)
    assert cli(["crosscoder-train"]) == 0

    monkeypatch.chdir(stopped)
    real, calls = train.train_step, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 23:  # in epoch 1, after the checkpoint of step 20
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(train, "train_step", interrupted)
    assert cli(["crosscoder-train"]) == 130
    monkeypatch.setattr(train, "train_step", real)
    assert cli(["crosscoder-train"]) == 0
    for name in ("epochs.csv", "history.csv"):
        frames = [pd.read_csv(directory / OUT_DIR / name) for directory in (straight, stopped)]
        pd.testing.assert_frame_equal(*frames)
    assert list(frames[0].step) == list(range(5, 41, 5))
    assert list(pd.read_csv(stopped / OUT_DIR / "epochs.csv").step) == [16, 32, 40]
    metrics = [json.loads((directory / OUT_DIR / "metrics.json").read_text()) for directory in (straight, stopped)]
    assert metrics[0] == metrics[1]


@pytest.mark.parametrize(("sets", "said"), [
    (["crosscoder.epochs=2"], "crosscoder.steps=40, crosscoder.epochs=2: give the run length as one of them"),
    (["crosscoder.steps=0"], "crosscoder.steps=0, crosscoder.epochs=0: give the run length as one of them"),
    (["crosscoder.decoder_norm_in_penalty=true"], "crosscoder.decoder_norm_in_penalty"),
])
def test_a_length_given_twice_or_not_at_all_and_an_old_penalty_flag_are_one_line_errors(project, capsys, sets, said):
    directory, repo_params = project
    make_crosscoder_project(directory, repo_params)
    assert cli(["crosscoder-train", *(f"--set={s}" for s in sets)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and said in err[0], err
    assert not (directory / OUT_DIR).exists()


# ---- CUDA -------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("num_workers", [0, 2])
def test_the_cuda_stream_gives_the_cpu_batches(tmp_path, num_workers):
    buffer = _write(tmp_path / "buffer", np.random.default_rng(0).normal(size=(3000, 24)).astype(np.float32), 8,
                    "bfloat16")
    with BatchStream(buffer, 256, 0, 0, 30, num_workers) as cpu:
        expected = list(cpu)
    model = Crosscoder(8, 16, 64).cuda()
    with BatchStream(buffer, 256, 0, 0, 30, num_workers, device="cuda") as gpu:
        for x, want in zip(gpu, expected, strict=True):
            model(x)[1].sum().item()  # the batch is used on the default stream while the next is copied
            assert x.is_cuda and torch.equal(x.cpu(), want)
