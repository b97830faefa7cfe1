"""Stage hmm_eval: how well the HMM predicts the next token, against uniform, unigram and bigram strategies.

For every test sequence x_0..x_{L-1}, each strategy gives a distribution for each x_t from x_<t:
  hmm      p(x_t | x_<t, the sequence goes on), from the forward algorithm (next_token_log_probs)
  uniform  1/K
  unigram  token frequencies of the training sequences
  bigram   p(x_t | x_{t-1}) counted on consecutive pairs within the training sequences; for x_0 the
           frequencies of first tokens
The baselines' probabilities are floored like the HMM's (eps + (1 - K eps) p), so an unseen token costs
-log(eps) rather than infinity. Reported for each subset of the test set: the final token's cross-entropy
-log p(x_{L-1} | x_<L-1) for each strategy (final_token_ce), and the KL divergence from the HMM's final-token
distribution to each baseline's (kl_from_hmm), both means over the subset's sequences. The subsets:
  overall     every test sequence
  unique      the deduplicated test set, each distinct sentence once (the seed's "unique test"; with
              hmm.seq_length > 0 the distinct sentences are cut into rows, as hmm_train does)
  singletons  the test sequences that occur exactly once in it
  duplicated  those that occur more than once, every copy (singletons and duplicated partition overall)
The per-position cross-entropy (mean over the sequences that reach the position) is a table and a plot.

The model is hmm_train's model.pt, or any saved HMM (run_eval's `model`: a model.pt, a checkpoint, an MLflow
URI such as models:/hmm-K100@champion); the outputs of another model than the stage's go to
artifacts/hmm/eval-<model>/, beside the stage's. Evaluation reads the model and writes nothing into it:
evaluating twice gives identical numbers.
"""

from __future__ import annotations

import collections
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from labpipe.config import Params, flatten
from labpipe.errors import InputError
from labpipe.files import atomic_path, write_json
from labpipe.hmm.em import pad_batches
from labpipe.hmm.forward_backward import next_token_log_probs
from labpipe.hmm.model import HMM
from labpipe.hmm.train import OUT_DIR as TRAIN_DIR
from labpipe.hmm.train import read_sequences
from labpipe.inputs import is_model_uri, load_torch, reason
from labpipe.plotting import pyplot, save_figure

OUT_DIR = Path("artifacts/hmm/eval")
STRATEGIES = ("hmm", "uniform", "unigram", "bigram")
SUBSETS = ("overall", "unique", "singletons", "duplicated")
MODEL = TRAIN_DIR / "model.pt"


def floored(probs: torch.Tensor, eps: float) -> torch.Tensor:
    """Rows normalized (an all-zero row becomes uniform) and mixed with the uniform distribution at eps."""
    n = probs.shape[-1]
    sums = probs.sum(-1, keepdim=True)
    probs = torch.where(sums > 0, probs / sums.clamp(min=1e-300), 1.0 / n)
    return eps + (1 - n * eps) * probs


@dataclass(frozen=True)
class Baselines:
    """log-probabilities of the n-gram strategies, fitted on training sequences."""

    unigram: torch.Tensor  # (K,)
    first: torch.Tensor  # (K,) first tokens: the bigram's prediction at position 0
    bigram: torch.Tensor  # (K, K) row a: p(next | a)

    @classmethod
    def fit(cls, sequences: list[np.ndarray], vocab_size: int, eps: float) -> Baselines:
        stream = np.concatenate(sequences).astype(np.int64)
        starts = np.cumsum([0] + [len(x) for x in sequences[:-1]])
        follows = np.ones(len(stream), dtype=bool)  # stream[i] follows stream[i - 1] in the same sequence
        follows[starts] = False
        counts = (
            np.bincount(stream, minlength=vocab_size),
            np.bincount(stream[starts], minlength=vocab_size),
            np.bincount(stream[:-1][follows[1:]] * vocab_size + stream[1:][follows[1:]],
                        minlength=vocab_size * vocab_size).reshape(vocab_size, vocab_size),
        )
        return cls(*(floored(torch.from_numpy(c).double(), eps).log() for c in counts))

    def log_probs(self, strategy: str, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L, K) log p(x_t = e | x_<t) of a baseline; padding gives values that callers mask."""
        batch, length = tokens.shape
        k = self.unigram.shape[0]
        if strategy == "uniform":
            return torch.full((batch, length, k), -float(np.log(k)), dtype=torch.float64)
        if strategy == "unigram":
            return self.unigram.expand(batch, length, k)
        if strategy == "bigram":
            return torch.cat([self.first.expand(batch, 1, k), self.bigram[tokens[:, :-1]]], dim=1)
        raise InputError(f"unknown strategy {strategy!r}: one of {', '.join(STRATEGIES)}")


@dataclass
class Evaluation:
    final_ce: dict[str, np.ndarray]  # strategy -> (N,) final-token cross-entropy per test sequence (nats)
    final_kl: dict[str, np.ndarray]  # baseline -> (N,) KL(hmm || baseline) of the final-token distributions
    singleton: np.ndarray  # (N,) bool: the sequence occurs once in the test sequences
    position_ce: pd.DataFrame  # position, sequences, and the mean cross-entropy of each strategy there


def summarize(full: Evaluation, unique: Evaluation) -> dict:
    """{final_token_ce: {subset: {strategy: mean}}, kl_from_hmm: {...}, sequences: {subset: count}} over the
    SUBSETS: the full test set's evaluation, masked, and the deduplicated set's own; a subset with no sequences
    has None (JSON null) for its means."""
    every = np.ones_like(full.singleton)
    parts = {"overall": (full, every), "unique": (unique, np.ones_like(unique.singleton)),
             "singletons": (full, full.singleton), "duplicated": (full, ~full.singleton)}

    def means(field: str) -> dict:
        return {subset: {name: float(v[mask].mean()) if mask.any() else None
                         for name, v in getattr(evaluation, field).items()}
                for subset, (evaluation, mask) in parts.items()}

    return {"final_token_ce": means("final_ce"), "kl_from_hmm": means("final_kl"),
            "sequences": {subset: int(mask.sum()) for subset, (_, mask) in parts.items()}}


def occurs_once(sequences: list[np.ndarray]) -> np.ndarray:
    keys = [x.tobytes() for x in sequences]
    counts = collections.Counter(keys)
    return np.array([counts[key] == 1 for key in keys])


@torch.no_grad()
def evaluate(hmm: HMM, baselines: Baselines, sequences: list[np.ndarray], batch_size: int) -> Evaluation:
    """Final-token cross-entropy and KL of every test sequence, and the per-position cross-entropy."""
    final_ce = {name: [] for name in STRATEGIES}
    final_kl = {name: [] for name in STRATEGIES[1:]}
    max_length = max(map(len, sequences))
    position_sum = {name: torch.zeros(max_length, dtype=torch.float64) for name in STRATEGIES}
    position_count = torch.zeros(max_length, dtype=torch.float64)
    batches = pad_batches(sequences, batch_size)
    for tokens, lengths in tqdm(batches, total=-(-len(sequences) // batch_size), desc="hmm eval", unit="batch"):
        valid = torch.arange(tokens.shape[1]) < lengths[:, None]
        last = lengths - 1
        rows = torch.arange(len(lengths))
        log_probs = {"hmm": next_token_log_probs(hmm, tokens, lengths)}
        log_probs |= {name: baselines.log_probs(name, tokens) for name in STRATEGIES[1:]}
        hmm_final = log_probs["hmm"][rows, last]  # (B, K)
        for name, lp in log_probs.items():
            observed = -lp.gather(2, tokens[:, :, None])[:, :, 0]  # (B, L) -log p(x_t | x_<t)
            observed = observed.masked_fill(~valid, 0.0)
            position_sum[name][: tokens.shape[1]] += observed.sum(0)
            final_ce[name].append(observed[rows, last])
            if name != "hmm":
                final_kl[name].append((hmm_final.exp() * (hmm_final - lp[rows, last])).sum(1))
        position_count[: tokens.shape[1]] += valid.sum(0)
    position_ce = pd.DataFrame({"position": np.arange(max_length), "sequences": position_count.long().numpy(),
                                **{name: (position_sum[name] / position_count).numpy() for name in STRATEGIES}})
    return Evaluation(
        final_ce={name: torch.cat(v).numpy() for name, v in final_ce.items()},
        final_kl={name: torch.cat(v).numpy() for name, v in final_kl.items()},
        singleton=occurs_once(sequences),
        position_ce=position_ce,
    )


def load_model(source: str | Path = MODEL) -> tuple[HMM, list[str] | None]:
    """The HMM (float64) and its words by id (None when the source has none) of hmm_train's model.pt, one of its
    checkpoints, or an MLflow model URI (models:/hmm-K100@champion, runs:/<id>/model); InputError naming it."""
    source = str(source)
    if is_model_uri(source):
        from labpipe.tracking import load_logged_model

        module = load_logged_model(source)
        state, vocab = module.state_dict(), getattr(module, "vocab", None)  # older modules carry no vocab
    else:
        saved = load_torch(source, "labpipe HMM (hmm_train's model.pt or checkpoint)")
        saved = saved if isinstance(saved, dict) else {}
        state = saved.get("hmm") or (saved.get("parts") or {}).get("model")
        vocab = saved.get("vocab")
    if not isinstance(state, dict):
        raise InputError(f"{source}: holds no HMM (hmm_train's model.pt, a checkpoint or a registered hmm model)")
    try:
        hmm = HMM.from_state_dict(state).to(dtype=torch.float64)
    except (InputError, TypeError, RuntimeError) as error:
        raise InputError(f"{source}: not a usable HMM ({reason(error)})") from None
    if vocab is not None and (len(vocab) != hmm.n_symbols or not all(isinstance(w, str) for w in vocab)):
        raise InputError(f"{source}: its vocabulary has {len(vocab)} entries for {hmm.n_symbols} symbols")
    return hmm, vocab


def out_dir_for(model: str | None) -> Path:
    """artifacts/hmm/eval for the stage's model; artifacts/hmm/eval-<model, as a file name> for another."""
    if model is None or Path(model) == MODEL:
        return OUT_DIR
    return OUT_DIR.with_name("eval-" + re.sub(r"[^\w.@-]+", "_", model).strip("_"))


def run_eval(params: Params, model: str | None = None) -> None:
    """Stage hmm_eval on hmm_train's model.pt, or on `model` (see load_model), written to out_dir_for(model)."""
    from labpipe.tracking import stage_run

    h = params.hmm
    source, out_dir = model or str(MODEL), out_dir_for(model)
    hmm, _ = load_model(source)
    if hmm.n_symbols != h.vocab_size:
        raise InputError(f"{source} emits {hmm.n_symbols} symbols, but hmm.vocab_size={h.vocab_size}")
    baselines = Baselines.fit(read_sequences("train", h), h.vocab_size, h.eps)
    result = evaluate(hmm, baselines, read_sequences("test", h), h.batch_size)
    summary = summarize(result, evaluate(hmm, baselines, read_sequences("test", h, unique=True), h.batch_size))
    write_json(out_dir / "metrics.json", summary)
    with atomic_path(out_dir / "per_position_ce.csv") as tmp:
        result.position_ce.to_csv(tmp, index=False)
    plot_position_ce(result.position_ce, out_dir / "per_position_ce.png", f"H={hmm.n_states}, K={h.vocab_size}")

    with stage_run(params.tracking, "hmm_eval", flatten(h, "hmm.")) as run:
        run.set_tags({"model": source})
        metrics = {f"final_ce/{subset}/{name}": value for subset, row in summary["final_token_ce"].items()
                   for name, value in row.items() if value is not None}
        metrics |= {f"kl_from_hmm/{subset}/{name}": value for subset, row in summary["kl_from_hmm"].items()
                    for name, value in row.items() if value is not None}
        metrics |= {f"sequences/{subset}": count for subset, count in summary["sequences"].items()}
        run.log_metrics(metrics, step=0)
        for row in result.position_ce.itertuples():
            run.log_metrics({f"position_ce/{name}": getattr(row, name) for name in STRATEGIES}, step=row.position)
        run.log_artifact(out_dir / "per_position_ce.png", "plots")
        run.log_artifact(out_dir / "metrics.json")
        run.log_outputs([out_dir])
    overall = summary["final_token_ce"]["overall"]
    print("final-token cross-entropy (nats): " + ", ".join(f"{name} {overall[name]:.4f}" for name in STRATEGIES))


def plot_position_ce(table: pd.DataFrame, path: Path, title: str) -> None:
    figure, axis = pyplot().subplots(figsize=(6, 4))
    for name in STRATEGIES:
        axis.plot(table.position, table[name], label=name, linewidth=2 if name == "hmm" else 1)
    axis.set(xlabel="position in the sequence", ylabel="cross-entropy (nats)", title=f"Next-token CE, {title}")
    axis.legend()
    save_figure(figure, path)
