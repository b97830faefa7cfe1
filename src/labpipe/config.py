"""params.yaml -> typed, frozen dataclasses.

params.yaml is the single source of truth for every knob: the dataclasses below declare the
keys and their types but no defaults, so a key missing from the file is an error, and so is a
key the dataclasses do not know. `--set section.key=value` overrides go through the same checks.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A params file or override that does not match the schema."""


@dataclasses.dataclass(frozen=True)
class TrackingParams:
    wandb: Literal["off", "offline", "online"]  # optional mirror of every MLflow run
    wandb_project: str


@dataclasses.dataclass(frozen=True)
class MHeightParams:
    seed: int
    n: tuple[int, ...]  # code lengths; groups are all (n, k, m) with k in `k`, m_min <= m <= n - k
    k: tuple[int, ...]
    m_min: int
    samples_per_group: int  # codes generated per (n, k, m) group
    p_max: float  # entries of P are uniform in [-p_max, p_max]
    integer_entries: bool  # integers (the course's data) or reals
    source: Literal["auto", "generate", "pickles"]  # auto: the course's pickles when import_dir has any
    import_dir: str
    workers: int  # processes for exact heights
    device: str  # auto | cpu | cuda
    train_per_group: int  # balanced subsample sizes
    val_per_group: int


@dataclasses.dataclass(frozen=True)
class GrokParams:
    seed: int
    model: Literal["resnet", "moe"]
    width: int
    blocks: int  # residual blocks per ResNet (per expert for the MoE)
    experts: int
    top_k: int
    balance_coef: float  # weight of the MoE load-balancing loss
    lr: float
    weight_decay: float
    batch_size: int
    epochs: int
    val_every: int
    checkpoint_every: int
    keep_checkpoints: int
    spike_factor: float  # a train-loss spike (Slingshot): loss > spike_factor * min of the last spike_window
    spike_window: int
    device: str


@dataclasses.dataclass(frozen=True)
class TextParams:
    source: str  # "generate" (labpipe's seeded story grammar), a Hugging Face dataset name, or a local path
    train_split: str
    test_split: str
    cache_dir: str  # Hugging Face datasets cache; "" for its default
    text_field: str
    stories: int  # source=generate: train stories (the test split gets a fifth as many, another seed)
    limit: int  # a dataset source: stories read per split, 0 for all
    seed: int
    vocab_sizes: tuple[int, ...]  # one token file per top-K vocabulary (seed: 100..500)


@dataclasses.dataclass(frozen=True)
class HMMParams:
    backend: Literal["torch", "pomegranate"]
    vocab_size: int  # which token file (one of text.vocab_sizes) the HMM is fitted on
    hidden_states: int
    seq_length: int  # 0: one sentence per sequence (a line of the token file); L > 0: the file's tokens cut
    #                  into rows of L, sentences running on (the seed's seq_length, 100..600)
    epochs: int
    batch_size: int
    update_freq: int  # M-step every update_freq minibatches (and at the end of each epoch)
    eps: float  # probability floor: a symbol absent from a batch never gets probability 0
    seed: int
    device: str
    checkpoint_every: int
    keep_checkpoints: int
    memory_budget_gb: float  # refuse to start when the E-step's estimated peak memory exceeds it


@dataclasses.dataclass(frozen=True)
class SynthParams:
    hmm_checkpoint: str  # an hmm_train model.pt ("hmm": HMM.state_dict()); sampled without its ends
    start: Literal["initial", "stationary"]  # first state: the HMM's start, or the transition's stationary law
    seq_length: int  # tokens per sequence
    sequences_per_shard: int  # a shard holds sequences_per_shard * seq_length tokens
    train_shards: int
    val_shards: int  # held-out shards for lm_train's validation and lm_eval, generated the same way
    block_sequences: int  # sequences sampled together (vectorized) and sharing one emission permutation
    permute_emissions: bool  # a fresh random permutation of the emission symbols per block (seed: per batch)
    seed: int
    workers: int  # processes; each shard has its own seed
    out_dir: str  # where shards go (may be outside the repo); the DVC output is the manifest


@dataclasses.dataclass(frozen=True)
class LMParams:
    hidden_size: int  # LlamaConfig (the seed: d = 768, ~100M parameters)
    layers: int
    heads: int
    intermediate_size: int
    context_length: int  # max_position_embeddings: synth.seq_length must fit
    vocab_size: int  # 0: the synthetic data's vocabulary; else at least it
    batch_size: int  # sequences per step
    lr: float
    weight_decay: float
    warmup_steps: int
    max_steps: int  # cosine decay to lr * min_lr_ratio at max_steps
    min_lr_ratio: float
    grad_clip: float
    eval_every: int
    eval_sequences: int  # validation sequences per evaluation
    checkpoint_every: int  # steps; HF save_pretrained directories, the input of dormancy and crosscoder
    keep_checkpoints: int  # 0 keeps all (dormancy wants the whole trajectory)
    num_workers: int  # DataLoader workers reading the memmapped shards
    compile: bool  # torch.compile the model
    seed: int
    device: str


@dataclasses.dataclass(frozen=True)
class DormancyParams:
    model: str  # a Hugging Face causal LM name or a local directory (lm_train's checkpoints: one step_* per revision)
    revisions: tuple[str, ...]  # hub revisions (step1000...) or step_* directories; empty: every step_* under model
    max_revisions: int  # 0: all; N: the first N (--quick: 2)
    text_source: str  # "synth" (the synthetic val shards, token ids), a Hugging Face dataset name, or a local path
    text_split: str
    text_field: str
    samples: int  # sequences per revision (the seed: 500; --quick: 100)
    max_length: int  # tokens per sample (truncation)
    batch_size: int
    thresholds: tuple[float, ...]  # dormant iff score <= tau; all in one pass (the seed: 0, 0.025, 0.1)
    device: str
    output_csv: str  # appended: a restarted run skips the revisions already complete


@dataclasses.dataclass(frozen=True)
class CrosscoderParams:
    source_a: str  # a causal LM (local directory, e.g. an lm_train checkpoint, or a Hugging Face name)
    source_b: str
    layer_a: int  # residual stream after this decoder layer
    layer_b: int
    text_source: str  # "synth" (the synthetic train shards), a Hugging Face dataset name, or a local path
    buffer_tokens: int  # activation rows harvested once into the on-disk buffer
    buffer_dtype: Literal["float16", "bfloat16"]
    buffer_dir: str
    dict_size: int  # F latents
    l1_coef: float  # lambda of the sparsity penalty
    l1_warmup_steps: int  # lambda ramps linearly from 0
    decoder_norm_in_penalty: bool  # lambda sum_i f_i sum_s |W_dec,i^s| (true) or lambda sum_i f_i (false)
    init: Literal["kaiming", "normal"]
    transpose_init: bool  # W_enc = W_dec^T at init
    dec_init_norm: float  # decoder rows normalized to this norm at init; 0 leaves them as drawn
    lr: float
    lr_warmup_steps: int
    lr_decay_start: float  # fraction of steps after which lr decays linearly to 0
    steps: int
    batch_size: int  # activation rows per step
    grad_clip: float
    log_every: int
    dead_window: int  # tokens: a latent not active in the last dead_window tokens is dead
    checkpoint_every: int
    num_workers: int  # DataLoader workers over the buffer
    seed: int
    device: str


@dataclasses.dataclass(frozen=True)
class Params:
    tracking: TrackingParams
    mheight: MHeightParams
    grok: GrokParams
    text: TextParams
    hmm: HMMParams
    synth: SynthParams
    lm: LMParams
    dormancy: DormancyParams
    crosscoder: CrosscoderParams


class _Yaml12Loader(yaml.SafeLoader):
    """YAML with 1.2 booleans (only true/false), as DVC reads params.yaml: `wandb: off` stays a string."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Yaml12Loader)


def load_params(path: str | Path = "params.yaml", overrides: typing.Sequence[str] = ()) -> Params:
    """Read params.yaml, apply `key=value` overrides, and check everything against the schema."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"params file not found: {path}")
    raw = parse_yaml(path.read_text()) or {}
    for override in overrides:
        apply_override(raw, override)
    return build(Params, raw, where=str(path))


def apply_override(raw: dict, override: str) -> None:
    """Set one `section.key=value` in the raw params dict; the key must exist in the schema."""
    key, sep, value = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r} is not of the form section.key=value")
    cls: Any = Params
    node = raw
    parts = key.split(".")
    for depth, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            where = ".".join(parts[:depth]) or "the top level"
            raise ConfigError(f"unknown key '{key}' in --set: valid keys under {where}: {', '.join(names)}")
        cls = _field_types(cls)[part]
        if depth < len(parts) - 1:
            if not dataclasses.is_dataclass(cls):
                raise ConfigError(f"--set {key}: '{'.'.join(parts[: depth + 1])}' is a value, not a section")
            node = node.setdefault(part, {})
    if dataclasses.is_dataclass(cls):
        raise ConfigError(f"--set {key}: '{key}' is a section; set one of its keys")
    node[parts[-1]] = parse_yaml(value) if value != "" else ""


def build(cls: type, data: Any, where: str, prefix: str = "") -> Any:
    """Recursively turn a dict into the dataclass `cls`, naming the offending key on any mismatch."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: '{prefix or 'params'}' must be a mapping, got {type(data).__name__}")
    hints = _field_types(cls)
    unknown = sorted(set(data) - set(hints))
    if unknown:
        full = ", ".join(prefix + str(k) for k in unknown)
        raise ConfigError(
            f"{where}: unknown key(s) {full}; valid keys under '{prefix.rstrip('.') or 'params'}': "
            + ", ".join(hints)
        )
    missing = [name for name in hints if name not in data]
    if missing:
        raise ConfigError(f"{where}: missing key(s) " + ", ".join(prefix + name for name in missing))
    values = {}
    for name, tp in hints.items():
        key = prefix + name
        if dataclasses.is_dataclass(tp):
            values[name] = build(tp, data[name], where, key + ".")
        else:
            values[name] = _coerce(tp, data[name], key, where)
    return cls(**values)


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(tp: Any, value: Any, key: str, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: {key} must be one of {', '.join(map(str, choices))}; got {value!r}")
        return value
    if origin is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: {key} must be a list, got {value!r}")
        return tuple(_coerce(item_tp, v, f"{key}[{i}]", where) for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{key}: union types are not supported in the schema")
    # bool is a subclass of int: never let `true` pass for a number, nor 1 for a flag.
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if tp is str and isinstance(value, str):
        return value
    raise ConfigError(f"{where}: {key} must be {tp.__name__}, got {type(value).__name__} {value!r}")


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """{'grok.lr': 0.001, ...}: the form MLflow params and DVC `-S` flags take."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.update(flatten(value, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = list(value) if isinstance(value, tuple) else value
    return out
