"""Stage dormancy: dormant neurons (Sokar et al. 2023) of a causal LM across its training checkpoints.

For the MLP neurons h of one layer, over every non-padding token of the text samples,

    s_i = E|h_i| / mean_k E|h_k|,    neuron i is dormant at threshold tau iff s_i <= tau,

so tau = 0 counts only the neurons that are exactly zero on every token. One pass over the data serves every
threshold: per layer, a running float64 sum of |h_i| per neuron and a running max (memory does not grow with
the samples), and one checkpoint in memory at a time. Models are loaded in float32 whatever their checkpoint's
dtype (Pythia's says float16), so that tau = 0 sees true zeros, not float16 underflow.

Neurons (HOOK_POINTS, keyed by config.model_type): GPT-NeoX (Pythia): the output of layers[i].mlp.act;
Llama (and Mistral, Qwen2): the SwiGLU product act_fn(gate_proj(x)) * up_proj(x), i.e. the input of
layers[i].mlp.down_proj, read by a forward pre-hook. Every decoder layer, or those `layers` lists (by index).

Revisions: a local directory holding step_XXXXXXXX/ save_pretrained checkpoints (lm_train's) gives one revision
per subdirectory, in step order; a single save_pretrained directory is one revision; any other name is a
Hugging Face model whose hub revisions are loaded by from_pretrained(name, revision="step1000") (the lab's
Pythia checkpoints). step = the last integer in the revision's name.

Text: "synth" = the first `samples` sequences of the synthetic val shards (token ids, no tokenizer, no padding);
else the first `samples` texts of a Hugging Face dataset or a local .txt/.json file, tokenized by the revision's
own tokenizer, truncated to max_length and padded on the right; the attention mask keeps padding out of every
statistic.

CSV (appended; one row per revision, analysed layer and threshold), columns exactly COLUMNS:
    timestamp       when the revision's rows were written (UTC, ISO 8601)
    model           the `model` param as given; revision, step as above
    threshold       tau
    layer_name      the hooked module, e.g. gpt_neox.layers.3.mlp.act; layer_index its decoder layer (i = 3)
    num_neurons     the layer's MLP width; num_dormant those with s_i <= tau
    pct_dormant     100 * num_dormant / num_neurons
    avg_activation  the mean over the layer's neurons of E|h_i| (the denominator of s_i)
    max_activation  the largest |h_i| over every non-padding token and neuron
A revision's rows are written together, atomically, so a killed run never leaves half a revision; a restarted
run skips the (model, revision, threshold) triples already in the file. The text and layers the rows were
made with sit beside it (<csv>.settings.json): appending with other settings is refused, since old rows would be
reused as if they were comparable (or complete).

The lab's Pythia analysis is the profile params.pythia.yaml; `labpipe dormancy --quick` (cli.py) is the seed's
quick test of a run: its first 2 revisions, 100 samples, into quick/test_<name of the CSV> beside the CSV.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from labpipe.config import DormancyParams, Params, flatten
from labpipe.device import resolve_device
from labpipe.dormancy.results import append_rows, read_results
from labpipe.errors import InputError
from labpipe.files import write_json
from labpipe.inputs import from_pretrained, read_json
from labpipe.text.corpus import HUB_NAME, load_stories

Batch = tuple[torch.Tensor, torch.Tensor]  # (input_ids, attention_mask), both (batch, length)
Hooked = tuple[int, str, torch.nn.Module]  # (decoder layer, layer name, the module whose output or input is h)

# model_type -> (the decoder layers, the module inside each layer, which side of that module is h)
HOOK_POINTS = {
    "gpt_neox": ("gpt_neox.layers", "mlp.act", "output"),
    "llama": ("model.layers", "mlp.down_proj", "input"),
    "mistral": ("model.layers", "mlp.down_proj", "input"),
    "qwen2": ("model.layers", "mlp.down_proj", "input"),
}
STEP_DIR = re.compile(r"step_?\d+")  # lm_train's step_00000050, or step1000 for hub revisions saved locally


# ----------------------------------------------------------------------------- checkpoints


@dataclasses.dataclass(frozen=True)
class Revision:
    name: str  # as in the CSV
    step: int
    source: str  # what from_pretrained loads: a directory, or a hub name
    hub_revision: str | None  # the hub revision; None for a directory


def step_of(name: str) -> int:
    digits = re.findall(r"\d+", name)
    return int(digits[-1]) if digits else 0


def list_revisions(d: DormancyParams) -> list[Revision]:
    """The revisions to analyze, in training order (or as listed); ValueError naming one that does not exist."""
    path = Path(d.model)
    if not path.is_dir():
        if not HUB_NAME.fullmatch(d.model):
            raise InputError(f"model {d.model!r} is neither a directory nor a Hugging Face model name")
        return _first(d, [Revision(name, step_of(name), d.model, name) for name in d.revisions or ["main"]])
    if (path / "config.json").exists():  # one save_pretrained directory, e.g. a single lm_train checkpoint
        available = {path.name: path}
    else:
        subdirs = [p for p in path.iterdir() if p.is_dir() and STEP_DIR.fullmatch(p.name)]
        available = {p.name: p for p in sorted(subdirs, key=lambda p: step_of(p.name))}
    if not available:
        raise InputError(f"no checkpoints in {path}: expected step_XXXXXXXX/ directories (lm_train's)")
    for name in d.revisions:
        if name not in available:
            raise InputError(f"revision {name!r} not found in {path}; available: {', '.join(available)}")
    return _first(d, [Revision(name, step_of(name), str(available[name]), None) for name in d.revisions or available])


def _first(d: DormancyParams, revisions: list[Revision]) -> list[Revision]:
    return revisions[: d.max_revisions] if d.max_revisions else revisions


def load_model(revision: Revision, device: torch.device) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = from_pretrained(AutoModelForCausalLM, revision.source, f"causal LM at revision {revision.name!r}",
                            revision=revision.hub_revision, dtype=torch.float32)
    return model.to(device).eval()


def hooked_modules(model: torch.nn.Module, chosen: tuple[int, ...]) -> tuple[list[Hooked], str]:
    """[(decoder layer, layer name, module)] of the `chosen` decoder layers (every one when empty), in layer order,
    whose output or input (the second value: "output" or "input") is h."""
    model_type = model.config.model_type
    if model_type not in HOOK_POINTS:
        raise InputError(f"no dormancy hook point for architecture {model_type!r}; known: {', '.join(HOOK_POINTS)}")
    layers_path, inner, side = HOOK_POINTS[model_type]
    layers = model.get_submodule(layers_path)
    if unknown := [i for i in chosen if i >= len(layers)]:
        raise InputError(f"dormancy.layers: no layer {', '.join(map(str, unknown))} in {model.name_or_path} "
                         f"({len(layers)} decoder layers: 0..{len(layers) - 1})")
    return [(i, f"{layers_path}.{i}.{inner}", layers[i].get_submodule(inner))
            for i in sorted(chosen) or range(len(layers))], side


# ----------------------------------------------------------------------------- text


def batch_source(d: DormancyParams) -> Callable[[Revision], Iterator[Batch]]:
    """revision -> its batches of the d.samples samples. The source is checked here, before any checkpoint loads."""
    if d.text_source == "synth":
        from labpipe.synth.manifest import load_manifest

        manifest = load_manifest()
        shards = manifest.split("val")
        if not sum(shard.sequences for shard in shards):
            raise InputError(f"{manifest.path}: the synthetic val shards hold no sequences")
        return lambda _revision: synth_batches(manifest, shards, d)
    texts = read_texts(d)
    return lambda revision: text_batches(texts, load_tokenizer(revision), d)


def synth_batches(manifest, shards, d: DormancyParams) -> Iterator[Batch]:
    """The first d.samples sequences of the val shards, cut to max_length; every row is real tokens."""
    left = d.samples
    for shard in shards:
        rows = manifest.open(shard)[:left, : d.max_length]  # a memmap: only these rows are ever read
        left -= len(rows)
        for first in range(0, len(rows), d.batch_size):
            ids = torch.from_numpy(rows[first:first + d.batch_size].astype(np.int64))
            yield ids, torch.ones_like(ids)
        if left == 0:
            return


def read_texts(d: DormancyParams) -> list[str]:
    """The first d.samples non-empty texts, read once so that every revision sees the same samples."""
    try:
        stories = load_stories(d.text_source, d.text_split, None, d.text_field)
        texts = list(itertools.islice((text for text in stories if text.strip()), d.samples))
    except FileNotFoundError as error:
        raise InputError(f"text source {d.text_source!r}: {error}") from error
    if not texts:
        raise InputError(f"text source {d.text_source!r} (split {d.text_split}) gave no text")
    return texts


def load_tokenizer(revision: Revision):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(revision.source, revision=revision.hub_revision)
    except (OSError, ValueError) as error:
        raise InputError(f"no tokenizer for {revision.source} at revision {revision.name!r} (a text source needs "
                         f"one; text_source=synth does not): {error}") from error
    if tokenizer.pad_token is None:  # Pythia's has none; padded positions are masked out anyway
        if tokenizer.eos_token is None:
            raise InputError(f"the tokenizer of {revision.source} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    # Right padding leaves every real token where it is unpadded: Llama's positions count from the first column
    # whatever the mask says, and causal attention never lets a real token see the padding after it.
    tokenizer.padding_side = "right"
    return tokenizer


def text_batches(texts: list[str], tokenizer, d: DormancyParams) -> Iterator[Batch]:
    for first in range(0, len(texts), d.batch_size):
        encoded = tokenizer(texts[first:first + d.batch_size], return_tensors="pt", padding=True, truncation=True,
                            max_length=d.max_length)
        yield encoded["input_ids"], encoded["attention_mask"]


# ----------------------------------------------------------------------------- statistics


class NeuronStats:
    """Running sum of |h_i| per neuron (float64) and max |h| over the non-padding tokens of one layer."""

    def __init__(self):
        self.abs_sum: torch.Tensor | None = None
        self.max_abs: torch.Tensor | None = None

    def add(self, h: torch.Tensor, weights: torch.Tensor) -> None:
        """h: (batch, length, neurons); weights: (batch, length), 1 on real tokens and 0 on padding."""
        magnitude = h.detach().abs().flatten(0, -2).float()  # .float(): a no-op for load_model's float32 models
        weights = weights.flatten()
        # A masked sum as one matrix-vector product, and a masked max from per-token maxima (|h| >= 0): no boolean
        # indexing, whose data-dependent shape would make a GPU wait at every layer of every batch. The product
        # sums one batch's tokens in float32 (10x faster than float64 on a CPU); the running sum over batches,
        # whose rounding error would grow with the samples, is float64.
        abs_sum = (weights @ magnitude).double()
        max_abs = (magnitude.amax(-1) * weights).max()
        self.abs_sum = abs_sum if self.abs_sum is None else self.abs_sum + abs_sum
        self.max_abs = max_abs if self.max_abs is None else torch.maximum(self.max_abs, max_abs)


@dataclasses.dataclass(frozen=True)
class LayerStats:
    index: int  # the decoder layer
    name: str
    mean_abs: np.ndarray  # E|h_i| per neuron over the non-padding tokens
    max_abs: float


@torch.inference_mode()
def layer_statistics(model: torch.nn.Module, batches, device: torch.device,
                     layers: tuple[int, ...] = ()) -> list[LayerStats]:
    """One pass over `batches` with a hook on the MLP neurons of each of `layers` (every layer when empty)."""
    modules, side = hooked_modules(model, layers)
    stats = [NeuronStats() for _ in modules]
    current = {}  # the batch's token weights, read by the hooks

    def observer(layer: NeuronStats):
        def hook(_module, inputs, output=None):  # a forward hook gets the output too, a pre-hook only the inputs
            layer.add(output if side == "output" else inputs[0], current["weights"])
        return hook

    register = "register_forward_hook" if side == "output" else "register_forward_pre_hook"
    handles = [getattr(module, register)(observer(layer))
               for (_index, _name, module), layer in zip(modules, stats, strict=True)]
    # The hooks need the decoder layers only: the backbone skips the LM head, more than half of Pythia-70m's
    # forward FLOPs (512 x 50k per token) and a batch x length x vocab logits tensor.
    backbone = model.base_model
    tokens = 0
    try:
        for input_ids, attention_mask in batches:
            tokens += int(attention_mask.sum())  # on the CPU, before the copy: no device sync
            attention_mask = attention_mask.to(device)
            current["weights"] = attention_mask.float()
            backbone(input_ids=input_ids.to(device), attention_mask=attention_mask, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    if tokens == 0:
        raise InputError("the text source gave no tokens")
    return [LayerStats(index, name, (layer.abs_sum / tokens).cpu().numpy(), float(layer.max_abs))
            for (index, name, _module), layer in zip(modules, stats, strict=True)]


def scores(mean_abs: np.ndarray) -> np.ndarray:
    """s_i = E|h_i| / mean_k E|h_k|; a layer that is zero everywhere scores 0 (every neuron dormant)."""
    average = mean_abs.mean()
    return mean_abs / average if average > 0 else np.zeros_like(mean_abs)


def revision_rows(d: DormancyParams, revision: Revision, layers: list[LayerStats],
                  thresholds: list[float]) -> list[dict]:
    timestamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    rows = []
    for threshold in thresholds:
        for layer in layers:
            dormant = int((scores(layer.mean_abs) <= threshold).sum())
            width = len(layer.mean_abs)
            rows.append({"timestamp": timestamp, "model": d.model, "revision": revision.name, "step": revision.step,
                         "threshold": threshold, "layer_name": layer.name, "layer_index": layer.index,
                         "num_neurons": width, "num_dormant": dormant, "pct_dormant": 100.0 * dormant / width,
                         "avg_activation": float(layer.mean_abs.mean()), "max_activation": layer.max_abs})
    return rows


def csv_settings(d: DormancyParams) -> dict:
    """What makes two runs' rows comparable: the text and the layers (a sorted list, as JSON reads it back)."""
    return {"text_source": d.text_source, "text_split": d.text_split, "text_field": d.text_field,
            "samples": d.samples, "max_length": d.max_length, "layers": sorted(d.layers)}


def settings_file(d: DormancyParams) -> Path:
    return Path(f"{d.output_csv}.settings.json")


def check_csv_settings(d: DormancyParams) -> None:
    """An InputError when the CSV holds rows made from other text, or of other layers, than d asks for."""
    settings, sidecar = csv_settings(d), settings_file(d)
    if Path(d.output_csv).exists() and sidecar.exists():
        saved = {"layers": [], **read_json(sidecar, "dormancy settings")}  # written before `layers`: every layer
        if saved != settings:
            raise InputError(f"{d.output_csv} holds rows made with {saved}, not {settings}: they would be reused as "
                             "if comparable; choose another output CSV (or delete it)")


# ----------------------------------------------------------------------------- the stage


def run_dormancy(params: Params) -> None:
    """Stage dormancy: analyze the revisions not yet in the CSV, then log every revision of the model to MLflow."""
    d = params.dormancy
    device = resolve_device(d.device, "dormancy.device")
    revisions = list_revisions(d)
    batches_of = batch_source(d)
    done = read_results(d.output_csv)
    check_csv_settings(d)
    done = set(zip(done.model, done.revision, done.threshold.astype(float), strict=True))
    # bars as context managers: closed before an error's line is printed, which stays the last one on stderr
    with tqdm(revisions, desc="checkpoints", unit="revision") as bar:
        for revision in bar:
            thresholds = [t for t in d.thresholds if (d.model, revision.name, t) not in done]
            if not thresholds:
                tqdm.write(f"{revision.name}: already in {d.output_csv}")
                continue
            model = load_model(revision, device)
            with tqdm(batches_of(revision), desc=revision.name, unit="batch", leave=False,
                      total=math.ceil(d.samples / d.batch_size)) as batches:
                layers = layer_statistics(model, batches, device, d.layers)
            del model  # before the next checkpoint loads: one in memory at a time
            append_rows(d.output_csv, revision_rows(d, revision, layers, thresholds))
            write_json(settings_file(d), csv_settings(d))  # beside the rows it describes, once there are rows

    results = read_results(d.output_csv)
    track(params, results[results.model == d.model])


def track(params: Params, results: pd.DataFrame) -> None:
    """% dormant per layer (and the mean over layers) as MLflow metrics at step = training step; the plots."""
    from labpipe.dormancy.plots import save_plots  # plots read results.py, not this module: no cycle
    from labpipe.tracking import stage_run

    d = params.dormancy
    plot_dir = Path(d.output_csv).parent / "plots"
    with stage_run(params.tracking, "dormancy", flatten(d, "dormancy.")) as run:
        for step, at_step in results.groupby("step"):
            metrics = {}
            for threshold, rows in at_step.groupby("threshold"):
                prefix = f"pct_dormant/tau_{threshold:g}"
                metrics.update({f"{prefix}/layer_{i}": p for i, p in zip(rows.layer_index, rows.pct_dormant,
                                                                          strict=True)})
                metrics[f"{prefix}/mean"] = rows.pct_dormant.mean()
            run.log_metrics(metrics, step=int(step))
        for path in save_plots(results, f"{plot_dir}/"):
            run.log_artifact(path, "plots")
        run.log_outputs([d.output_csv, plot_dir])
