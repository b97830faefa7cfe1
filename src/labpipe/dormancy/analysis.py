"""Stage dormancy: dormant neurons (Sokar et al. 2023) of a causal LM across its training checkpoints.

For the MLP neurons h of one layer, over every non-padding token of the text samples,

    s_i = E|h_i| / mean_k E|h_k|,    neuron i is dormant at threshold tau iff s_i <= tau,

so tau = 0 counts only neurons that are exactly zero on every token. All thresholds come from one pass over
the data: per layer, a running float64 sum of |h_i| and a token count (memory does not grow with the samples).

Neurons (HOOK_POINTS, keyed by config.model_type): GPT-NeoX (Pythia): the output of layers[i].mlp.act;
Llama: the SwiGLU product act_fn(gate_proj(x)) * up_proj(x), i.e. the input of layers[i].mlp.down_proj.

Revisions: a local directory holding step_XXXXXXXX/ save_pretrained checkpoints (lm_train's) gives one revision
per subdirectory; a Hugging Face name takes hub revisions (from_pretrained(name, revision="step1000"), as the
lab's Pythia checkpoints). step = the integer in the revision's name.

CSV (appended; one row per revision, layer and threshold), columns exactly COLUMNS:
    avg_activation  mean over the layer's neurons of E|h_i|      (the denominator of s_i)
    max_activation  the largest |h_i| on any token and neuron
    pct_dormant     100 * num_dormant / num_neurons
A revision's rows are written together, atomically, so a killed run never leaves half a revision; a restarted
run skips the (model, revision, threshold) triples already in the file. The text settings the rows were made
with sit beside it (<csv>.settings.json): appending with other settings is refused, since old rows would be
reused as if they were comparable.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from labpipe.config import DormancyParams, Params, flatten
from labpipe.device import resolve_device
from labpipe.files import atomic_path, write_json

LINE = "dormant-neurons"
COLUMNS = ["timestamp", "model", "revision", "step", "threshold", "layer_name", "layer_index", "num_neurons",
           "num_dormant", "pct_dormant", "avg_activation", "max_activation"]
# model_type -> (the list of decoder layers, the module inside a layer, whether its "output" or "input" is h)
HOOK_POINTS = {
    "gpt_neox": ("gpt_neox.layers", "mlp.act", "output"),
    "llama": ("model.layers", "mlp.down_proj", "input"),
    "mistral": ("model.layers", "mlp.down_proj", "input"),
    "qwen2": ("model.layers", "mlp.down_proj", "input"),
}
STEP_DIR = re.compile(r"step_?\d+")


@dataclasses.dataclass(frozen=True)
class Revision:
    name: str  # as in the CSV
    step: int
    source: str  # what from_pretrained loads: a directory, or a hub name
    hub_revision: str | None  # the hub revision, None for a directory


def step_of(name: str) -> int:
    digits = re.findall(r"\d+", name)
    return int(digits[-1]) if digits else 0


def list_revisions(d: DormancyParams) -> list[Revision]:
    """The revisions to analyze, in training order; ValueError naming a revision that does not exist."""
    path = Path(d.model)
    if path.is_dir():
        available = sorted((p.name for p in path.iterdir() if p.is_dir() and STEP_DIR.fullmatch(p.name)), key=step_of)
        if not available and (path / "config.json").exists():  # a single model directory
            available = ["."]
        for name in d.revisions:
            if name not in available:
                raise ValueError(f"revision {name!r} not found in {path}; available: {', '.join(available) or 'none'}")
        revisions = [Revision(name, step_of(name), str(path / name), None) for name in d.revisions or available]
    else:
        revisions = [Revision(name, step_of(name), d.model, name) for name in d.revisions or ["main"]]
    if not revisions:
        raise ValueError(f"no checkpoints under {path}: expected step_XXXXXXXX/ directories (lm_train's)")
    return revisions[: d.max_revisions] if d.max_revisions else revisions


def load_model(revision: Revision, device: torch.device) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(revision.source, revision=revision.hub_revision)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot load {revision.source} at revision {revision.name!r}: {error}") from error
    return model.to(device).eval()


def hooked_modules(model: torch.nn.Module) -> tuple[list[tuple[str, torch.nn.Module]], str]:
    """[(layer name, module)] whose output or input (the second value) holds the MLP neurons."""
    model_type = model.config.model_type
    if model_type not in HOOK_POINTS:
        raise ValueError(f"no dormancy hook point for architecture {model_type!r}; known: {', '.join(HOOK_POINTS)}")
    layers_path, inner, side = HOOK_POINTS[model_type]
    layers = model.get_submodule(layers_path)
    return [(f"{layers_path}.{i}.{inner}", layer.get_submodule(inner)) for i, layer in enumerate(layers)], side


# ----------------------------------------------------------------------------- text


def token_batches(d: DormancyParams, revision: Revision) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, attention_mask) batches of d.samples samples, at most d.max_length tokens each."""
    if d.text_source == "synth":
        from labpipe.synth.manifest import load_manifest

        manifest = load_manifest()
        rows = np.concatenate([manifest.open(shard)[:, : d.max_length] for shard in manifest.split("val")])[: d.samples]
        if len(rows) == 0:
            raise ValueError(f"{manifest.path}: the val shards hold no sequences")
        for first in range(0, len(rows), d.batch_size):
            ids = torch.from_numpy(rows[first:first + d.batch_size].astype(np.int64))
            yield ids, torch.ones_like(ids)
        return
    from transformers import AutoTokenizer

    from labpipe.text.corpus import load_stories

    texts = [t for t in load_stories(d.text_source, d.text_split, None, d.text_field, d.samples) if t.strip()]
    if not texts:
        raise ValueError(f"text source {d.text_source!r} (split {d.text_split}) gave no text")
    tokenizer = AutoTokenizer.from_pretrained(revision.source, revision=revision.hub_revision)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    for first in range(0, len(texts), d.batch_size):
        encoded = tokenizer(texts[first:first + d.batch_size], return_tensors="pt", padding=True, truncation=True,
                            max_length=d.max_length)
        yield encoded["input_ids"], encoded["attention_mask"]


# ----------------------------------------------------------------------------- statistics


class NeuronStats:
    """Running sums of |h_i| over the non-padding tokens of one layer."""

    def __init__(self):
        self.abs_sum: torch.Tensor | None = None
        self.max_abs = 0.0
        self.tokens = 0

    def add(self, h: torch.Tensor, mask: torch.Tensor) -> None:
        flat = h[mask].abs()  # (tokens, neurons): padding dropped before anything is summed
        sums = flat.sum(0, dtype=torch.float64)
        self.abs_sum = sums if self.abs_sum is None else self.abs_sum + sums
        self.max_abs = max(self.max_abs, float(flat.max())) if flat.numel() else self.max_abs
        self.tokens += flat.shape[0]

    def mean_abs(self) -> np.ndarray:
        return (self.abs_sum / self.tokens).cpu().numpy()


def scores(mean_abs: np.ndarray) -> np.ndarray:
    """s_i = E|h_i| / mean_k E|h_k|; a layer that is zero everywhere scores 0 (every neuron dormant)."""
    average = mean_abs.mean()
    return mean_abs / average if average > 0 else np.zeros_like(mean_abs)


@torch.no_grad()
def layer_statistics(model: torch.nn.Module, batches, device: torch.device) -> list[tuple[str, NeuronStats]]:
    modules, side = hooked_modules(model)
    stats = [NeuronStats() for _ in modules]
    current_mask: list[torch.Tensor] = []

    def hook_for(layer_stats: NeuronStats):
        if side == "output":
            return lambda _module, _inputs, output: layer_stats.add(output, current_mask[0])
        return lambda _module, inputs: layer_stats.add(inputs[0], current_mask[0])

    handles = [(module.register_forward_hook if side == "output" else module.register_forward_pre_hook)(
        hook_for(layer_stats)) for (_name, module), layer_stats in zip(modules, stats, strict=True)]
    try:
        for input_ids, attention_mask in batches:
            input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
            current_mask[:] = [attention_mask.bool()]
            model(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        for handle in handles:
            handle.remove()
    if stats[0].tokens == 0:
        raise ValueError("the text source gave no tokens")
    return [(name, layer_stats) for (name, _module), layer_stats in zip(modules, stats, strict=True)]


def revision_rows(d: DormancyParams, revision: Revision, layers: list[tuple[str, NeuronStats]],
                  thresholds: list[float]) -> list[dict]:
    timestamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    rows = []
    for threshold in thresholds:
        for index, (name, layer_stats) in enumerate(layers):
            mean_abs = layer_stats.mean_abs()
            dormant = int((scores(mean_abs) <= threshold).sum())
            rows.append({"timestamp": timestamp, "model": d.model, "revision": revision.name, "step": revision.step,
                         "threshold": threshold, "layer_name": name, "layer_index": index,
                         "num_neurons": len(mean_abs), "num_dormant": dormant,
                         "pct_dormant": 100.0 * dormant / len(mean_abs), "avg_activation": float(mean_abs.mean()),
                         "max_activation": layer_stats.max_abs})
    return rows


# ----------------------------------------------------------------------------- the CSV


def read_results(path: str | Path) -> pd.DataFrame:
    """The CSV, or an empty frame; ValueError when its columns are not exactly COLUMNS."""
    path = Path(path)
    if not path.exists():
        return pd.DataFrame(columns=COLUMNS)
    frame = pd.read_csv(path)
    if list(frame.columns) != COLUMNS:
        raise ValueError(f"{path} has columns {list(frame.columns)}, not {COLUMNS}: refusing to append to it "
                         "(choose another output CSV)")
    return frame


def append_rows(path: str | Path, rows: list[dict]) -> None:
    """Old rows plus the new ones, written whole (atomically)."""
    frame = pd.concat([read_results(path), pd.DataFrame(rows, columns=COLUMNS)], ignore_index=True)
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def check_text_settings(d: DormancyParams) -> None:
    """ValueError when the CSV holds rows made from other text than d asks for; else record d's settings."""
    settings = {key: getattr(d, key) for key in ("text_source", "text_split", "text_field", "samples", "max_length")}
    sidecar = Path(f"{d.output_csv}.settings.json")
    if Path(d.output_csv).exists() and sidecar.exists():
        saved = json.loads(sidecar.read_text())
        if saved != settings:
            raise ValueError(f"{d.output_csv} holds rows made with {saved}, not {settings}: they would be reused as "
                             "if comparable; choose another output CSV (or delete it)")
    write_json(sidecar, settings)


def run_dormancy(params: Params) -> None:
    """Stage dormancy."""
    from labpipe.dormancy.plots import save_plots
    from labpipe.tracking import stage_run

    d = params.dormancy
    device = resolve_device(d.device)
    revisions = list_revisions(d)
    done = read_results(d.output_csv)
    check_text_settings(d)
    done = set(zip(done.model, done.revision, done.threshold.astype(float), strict=True))
    for revision in tqdm(revisions, desc="checkpoints", unit="revision"):
        thresholds = [float(t) for t in d.thresholds if (d.model, revision.name, float(t)) not in done]
        if not thresholds:
            tqdm.write(f"{revision.name}: already in {d.output_csv}")
            continue
        model = load_model(revision, device)  # one checkpoint in memory at a time
        batches = tqdm(token_batches(d, revision), desc=revision.name, unit="batch", leave=False)
        append_rows(d.output_csv, revision_rows(d, revision, layer_statistics(model, batches, device), thresholds))
        del model

    results = read_results(d.output_csv)
    results = results[results.model == d.model]
    plot_dir = Path(d.output_csv).parent / "plots"
    with stage_run(params.tracking, LINE, "dormancy", flatten(d, "dormancy.")) as run:
        for (step, threshold), rows in results.groupby(["step", "threshold"]):
            metrics = {f"pct_dormant/tau_{threshold:g}/layer_{i}": p
                       for i, p in zip(rows.layer_index, rows.pct_dormant, strict=True)}
            metrics[f"pct_dormant/tau_{threshold:g}/mean"] = float(rows.pct_dormant.mean())
            run.log_metrics(metrics, step=int(step))
        for path in save_plots(results, f"{plot_dir}/"):
            run.log_artifact(path, "plots")
        run.log_outputs([d.output_csv, plot_dir])
