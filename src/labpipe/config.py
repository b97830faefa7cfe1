"""params.yaml -> typed, frozen dataclasses.

params.yaml is the single source of truth for every knob: the dataclasses below declare the
keys and their types but no defaults, so a key missing from the file is an error, and so is a
key the dataclasses do not know. `--set section.key=value` overrides go through the same checks.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from labpipe.errors import UserError
from labpipe.inputs import read_text


class ConfigError(UserError, ValueError):
    """A params file or override that does not match the schema."""


@dataclasses.dataclass(frozen=True)
class Bound:
    """Declared range of a numeric param: low <= value <= high (strict where `*_open`). Every float param must
    also be finite: NaN and inf are never a setting."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def check(self, value: float) -> str | None:
        """None when `value` is in range, else what it must be."""
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return None


# The bounds most knobs need, by meaning.
Count = Annotated[int, Bound(1)]  # sizes, steps, batch sizes, intervals: at least 1
Natural = Annotated[int, Bound(0)]  # 0 allowed (0 = off / all / keep every one, as the key's comment says)
Positive = Annotated[float, Bound(0, low_open=True)]  # learning rates, budgets, scales
NonNegative = Annotated[float, Bound(0)]  # coefficients that may be switched off
Fraction = Annotated[float, Bound(0, 1)]


@dataclasses.dataclass(frozen=True)
class TrackingParams:
    wandb: Literal["off", "offline", "online"]  # optional mirror of every MLflow run
    wandb_project: str
    system_metrics: bool  # CPU, memory, disk, network and GPU of each training run: MLflow's system/* metrics
    system_metrics_interval_s: Annotated[float, Bound(1)]  # seconds between two samples


@dataclasses.dataclass(frozen=True)
class MHeightParams:
    seed: Natural
    n: tuple[Annotated[int, Bound(2)], ...]  # code lengths; groups are all (n, k, m) with k in `k`, m_min <= m <= n - k
    k: tuple[Count, ...]
    m_min: Count
    samples_per_group: Count  # codes generated per (n, k, m) group
    p_max: Positive  # entries of P are uniform in [-p_max, p_max]
    integer_entries: bool  # integers (the course's data) or reals
    source: Literal["auto", "generate", "pickles"]  # auto: the course's pickles when import_dir has any
    import_dir: str
    workers: Count  # processes for exact heights (on the CPU; a GPU computes in the main process)
    device: str  # auto | cpu | cuda
    train_per_group: Count  # balanced subsamples, drawn within the course's split where the data has one
    val_per_group: Count
    test_per_group: Natural  # 0 = no test split
    violation_samples: Natural  # per code, the largest h_m(xG) over this many seeded random x: a lower bound on
    #                             h_m(G) (column `bound`); 0 = no bound (bound = 1)
    verify_imported: Natural  # imported records whose height is recomputed exactly: all when fewer, else a
    #                           seeded sample; 0 = off

    def __post_init__(self):
        if any(k >= n for n in self.n for k in self.k):
            raise ConfigError(f"mheight.k must be smaller than every mheight.n; got n={list(self.n)}, k={list(self.k)}")


@dataclasses.dataclass(frozen=True)
class GrokParams:
    seed: Natural
    model: Literal["resnet", "moe"]
    width: Count
    blocks: Count  # residual blocks per ResNet (per expert for the MoE)
    experts: Count
    top_k: Count
    gate_input: Literal["nk", "nkm"]  # moe: the gate sees the (n, k) pair (the seed's) or the (n, k, m) group
    gating: Literal["soft", "hard"]  # moe: soft top-k over learnt gate logits, or hard: each gate input to one expert
    balance_coef: NonNegative  # weight of the MoE load-balancing loss
    output_head: Literal["log2", "seed"]  # log2 h_hat = softplus(z) (labpipe), or the seed's h_hat = 1 + softplus(z)
    violation_coef: NonNegative  # weight of relu(log2 bound - log2 h_hat)^2 (mheight.violation_samples); 0 = off
    lr: Positive
    weight_decay: NonNegative
    batch_size: Count
    epochs: Count  # run length: raising it extends a finished run (not part of the resume fingerprint)
    val_every: Count
    checkpoint_every: Count
    keep_checkpoints: Natural
    spike_factor: Annotated[float, Bound(1, low_open=True)]  # a train-loss spike (Slingshot): loss > spike_factor *
    spike_window: Count  # the min of the last spike_window epochs; also the window after a spike that is reported
    grokking_window: Annotated[int, Bound(2)]  # validations: the plateau before the grokking drop, and the drop itself
    grokking_drop: Annotated[float, Bound(0, 1, low_open=True, high_open=True)]  # the least relative fall of the drop
    stop_after_plateau: Natural  # stop when val has not improved for this many validations after grokking; 0 = off
    init_from: str  # "" | a checkpoint or model.pt | models:/mheight-regressor@champion: fine-tune from those weights
    init_experts_from: tuple[str, ...]  # moe: one ResNet (file or models:/ URI) per expert, or one for all of them;
    #                                     [] = random experts
    device: str

    def __post_init__(self):
        if self.model == "moe" and self.top_k > self.experts:
            raise ConfigError(f"grok.top_k={self.top_k} must be at most grok.experts={self.experts}")
        if self.init_experts_from and (self.model != "moe" or len(self.init_experts_from) not in (1, self.experts)):
            raise ConfigError(f"grok.init_experts_from lists {len(self.init_experts_from)} models: it needs "
                              f"grok.model=moe and one model for all experts or one per expert "
                              f"(grok.experts={self.experts})")
        if self.init_experts_from and self.init_from:
            raise ConfigError("grok.init_from and grok.init_experts_from are exclusive: set one of them")


@dataclasses.dataclass(frozen=True)
class TextParams:
    source: str  # "generate" (labpipe's seeded story grammar), a Hugging Face dataset name, a local path, or
    #              "token-files:DIR": the lab's own TinyStories-{K}-{train,test}.txt and tokenizer.json in DIR
    train_split: str
    test_split: str
    cache_dir: str  # Hugging Face datasets cache; "" for its default
    text_field: str
    stories: Count  # source=generate: train stories (the test split gets a fifth as many, another seed)
    limit: Natural  # a dataset source: stories read per split, 0 for all
    seed: Natural
    vocab_sizes: tuple[Annotated[int, Bound(2)], ...]  # one token file per top-K vocabulary (seed: 100..500)


@dataclasses.dataclass(frozen=True)
class HMMParams:
    backend: Literal["torch", "pomegranate"]
    vocab_size: Annotated[int, Bound(2)]  # which token file (one of text.vocab_sizes) the HMM is fitted on
    hidden_states: Count
    seq_length: Natural  # 0: one sentence per sequence (a line of the token file); L > 0: the file's tokens cut
    #                      into rows of L, sentences running on (the seed's seq_length, 100..600)
    epochs: Count  # run length: raising it extends a finished run
    batch_size: Count
    update_freq: Natural  # M-step every update_freq minibatches (and at the end of each epoch); 0: one M-step per
    #                       epoch, on the whole epoch's statistics (the seed's "update_freq-all")
    train_unique: bool  # fit on the train file's distinct sentences, each once (the seed's unique: 6,899 of 74,514)
    eps: Annotated[float, Bound(0, 0.01, low_open=True)]  # probability floor: a symbol absent from a batch never
    #                                                        gets probability 0; eps * max(H, K) < 1
    seed: Natural
    init_from: str  # "" | an hmm model.pt or checkpoint | models:/hmm-K100@champion: EM starts from that HMM
    device: str
    checkpoint_every: Count
    keep_checkpoints: Natural
    memory_budget_gb: Positive  # refuse to start when the E-step's estimated peak memory exceeds it

    def __post_init__(self):
        if self.eps * max(self.hidden_states, self.vocab_size) >= 1:  # rows of that length cannot all be >= eps
            raise ConfigError(f"hmm.eps={self.eps:g} must be below 1 / max(hmm.hidden_states, hmm.vocab_size) = "
                              f"{1 / max(self.hidden_states, self.vocab_size):g}")


@dataclasses.dataclass(frozen=True)
class SynthParams:
    hmm_checkpoint: str  # an hmm_train model.pt ("hmm": HMM.state_dict()); sampled without its ends
    start: Literal["initial", "stationary"]  # first state: the HMM's start, or the transition's stationary law
    seq_length: Count  # tokens per sequence
    sequences_per_shard: Count  # a shard holds sequences_per_shard * seq_length tokens
    train_shards: Count
    val_shards: Count  # held-out shards for lm_train's validation and lm_eval, generated the same way
    block_sequences: Count  # sequences sampled together (vectorized) and sharing one emission permutation
    permute_emissions: bool  # a fresh random permutation of the emission symbols per block (seed: per batch)
    seed: Natural
    workers: Count  # processes; each shard has its own seed
    out_dir: str  # where shards go (may be outside the repo); the DVC output is the manifest


@dataclasses.dataclass(frozen=True)
class LMParams:
    hidden_size: Count  # LlamaConfig (the seed: d = 768, ~100M parameters)
    layers: Count
    heads: Count
    intermediate_size: Count
    context_length: Count  # max_position_embeddings: synth.seq_length must fit
    vocab_size: Natural  # 0: the synthetic data's vocabulary; else at least it
    batch_size: Count  # sequences per forward pass
    grad_accum_steps: Count  # a step's batch is batch_size * grad_accum_steps rows, dealt to the ranks
    lr: Positive
    adam_beta1: Annotated[float, Bound(0, 1, high_open=True)]
    adam_beta2: Annotated[float, Bound(0, 1, high_open=True)]  # Llama's 0.95: forgets fast enough for a short warmup
    weight_decay: NonNegative
    warmup_steps: Natural
    decay_steps: Count  # the cosine reaches lr * min_lr_ratio at this step and stays there: the schedule's length
    max_steps: Count  # run length: raising it extends a finished run (past decay_steps at the minimum lr)
    min_lr_ratio: Fraction
    grad_clip: Positive
    log_every: Count  # steps per MLflow point (means over the window)
    eval_every: Count
    eval_sequences: Count  # validation sequences per evaluation
    checkpoint_every: Count  # steps; HF save_pretrained directories, the input of dormancy and crosscoder
    keep_checkpoints: Natural  # 0 keeps all (dormancy wants the whole trajectory)
    num_workers: Natural  # DataLoader workers reading the memmapped shards
    compile: bool  # torch.compile the model
    seed: Natural
    init_from: str  # "" | a save_pretrained directory (a step_* checkpoint, artifacts/lm/model) | models:/...
    device: str
    devices: Natural  # ranks labpipe starts on this host (0: one per GPU); under torchrun or Slurm, theirs
    collective_timeout_s: Positive  # a rank waiting this long for the others fails the job (a dead or hung rank)

    def __post_init__(self):
        if self.hidden_size % self.heads:
            raise ConfigError(f"lm.hidden_size={self.hidden_size} is not a multiple of lm.heads={self.heads}")
        if self.warmup_steps > self.decay_steps:
            raise ConfigError(f"lm.warmup_steps={self.warmup_steps} must be at most lm.decay_steps={self.decay_steps}")


@dataclasses.dataclass(frozen=True)
class DormancyParams:
    model: str  # a Hugging Face causal LM name or a local directory (lm_train's checkpoints: one step_* per revision)
    revisions: tuple[str, ...]  # hub revisions (step1000...) or step_* directories; empty: every step_* under model
    max_revisions: Natural  # 0: all; N: the first N (--quick: 2)
    layers: tuple[Natural, ...]  # decoder layers analysed (the CSV's layer_index); empty: every layer
    text_source: str  # "synth" (the synthetic val shards, token ids), a Hugging Face dataset name, or a local path
    text_split: str
    text_field: str
    samples: Count  # sequences per revision (the seed: 500; --quick: 100)
    max_length: Count  # tokens per sample (truncation)
    batch_size: Count
    thresholds: tuple[NonNegative, ...]  # dormant iff score <= tau; all in one pass (the seed: 0, 0.025, 0.1)
    device: str
    output_csv: str  # appended: a restarted run skips the revisions complete; --quick: quick/test_<name> beside it

    def __post_init__(self):
        if twice := sorted({i for i in self.layers if self.layers.count(i) > 1}):
            raise ConfigError(f"dormancy.layers lists layer {', '.join(map(str, twice))} more than once")


@dataclasses.dataclass(frozen=True)
class CrosscoderParams:
    source_a: str  # a causal LM (local directory, e.g. an lm_train checkpoint, or a Hugging Face name)
    source_b: str
    layer_a: Natural  # residual stream after this decoder layer
    layer_b: Natural
    text_source: str  # "synth" (the synthetic train shards), a Hugging Face dataset name, or a local path
    text_split: str  # a text source's split and field
    text_field: str
    text_context: Count  # tokens per sequence from a text source (fewer if the models' context is shorter)
    buffer_tokens: Count  # activation rows harvested once into the on-disk buffer
    buffer_dtype: Literal["float16", "bfloat16"]
    buffer_dir: str
    dict_size: Count  # F latents
    l1_coef: NonNegative  # lambda of the sparsity penalty
    l1_warmup_steps: Natural  # lambda ramps linearly from 0
    # the sparsity term: lambda sum_i f_i (none), lambda sum_i f_i sum_s ||W_dec,i^s|| with the norms as constants
    # (detached: no gradient to the decoder from it) or with their gradient (full, the reference crosscoder's)
    decoder_norm_in_penalty: Literal["none", "detached", "full"]
    init: Literal["kaiming", "normal"]
    transpose_init: bool  # W_enc = W_dec^T at init
    dec_init_norm: NonNegative  # decoder rows normalized to this norm at init; 0 leaves them as drawn
    lr: Positive
    lr_warmup_steps: Natural
    lr_decay_start: Fraction  # fraction of steps after which lr decays linearly to 0 (at `steps`)
    steps: Natural  # run length in steps, or 0 when epochs gives it; the schedule's length too: a finished run
    #                 cannot be extended
    epochs: Natural  # run length in epochs of the buffer (epochs * ceil(rows / batch_size) steps), or 0
    batch_size: Count  # activation rows per step
    grad_clip: NonNegative  # 0: not clipped
    log_every: Count
    dead_window: Count  # tokens: a latent not active in the last dead_window tokens is dead
    eval_rows: Count  # final metrics over up to this many rows spread evenly through the buffer
    champion_l0_min: NonNegative  # champion candidates: final L0 (mean active latents per token) within [min, max]
    champion_l0_max: NonNegative
    checkpoint_every: Count
    keep_checkpoints: Count  # resume needs the newest; one more in case the disk lost the newest's last write
    num_workers: Natural  # DataLoader workers over the buffer
    seed: Natural
    init_from: str  # "" | a crosscoder model.pt or checkpoint | models:/crosscoder@champion (same d_a, d_b, F)
    device: str

    def __post_init__(self):
        if (self.steps > 0) == (self.epochs > 0):
            raise ConfigError(f"crosscoder.steps={self.steps}, crosscoder.epochs={self.epochs}: give the run length "
                              "as one of them and set the other to 0")
        if self.champion_l0_min > self.champion_l0_max:
            raise ConfigError(f"crosscoder.champion_l0_min={self.champion_l0_min} is above "
                              f"crosscoder.champion_l0_max={self.champion_l0_max}")


class _Yaml12Loader(yaml.SafeLoader):
    """YAML with 1.2 booleans (only true/false), as DVC reads params.yaml: `wandb: off` stays a string."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def parse_yaml(text: str, where: str = "") -> Any:
    """YAML 1.2 as DVC reads it; a syntax error is a ConfigError naming `where` and the line."""
    try:
        return yaml.load(text, Loader=_Yaml12Loader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{where or 'YAML'}: invalid YAML{at}: {problem}") from None


def load_params(path: str | Path = "params.yaml", overrides: typing.Sequence[str] = ()) -> Params:
    """Read params.yaml, apply `key=value` overrides, and check everything against the schema."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"params file not found: {path}")
    raw = parse_yaml(read_text(path), where=str(path)) or {}
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
    node[parts[-1]] = parse_yaml(value, where=f"--set {key}") if value != "" else ""


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
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(tp: Any, value: Any, key: str, where: str) -> Any:
    bounds = ()
    if typing.get_origin(tp) is Annotated:
        tp, *bounds = typing.get_args(tp)
    value = _coerce_type(tp, value, key, where)
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: {key} must be a finite number, got {value!r}")
    for bound in bounds:
        if (needed := bound.check(value)) is not None:
            raise ConfigError(f"{where}: {key} must be {needed}, got {value!r}")
    return value


def _coerce_type(tp: Any, value: Any, key: str, where: str) -> Any:
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


def _compose_params() -> type:
    """Params: `tracking` and every section of every research line of the registry, in its order."""
    from labpipe import registry

    sections = [("tracking", TrackingParams)]
    for line in registry.LINES:
        for name, target in line.sections.items():
            module, _, attribute = target.partition(":")
            cls = globals()[attribute] if module == __name__ else registry.resolve(target)
            sections.append((name, cls))
    params = dataclasses.make_dataclass("Params", sections, frozen=True)
    params.__module__ = __name__  # get_type_hints resolves the sections here
    return params


Params = _compose_params()
