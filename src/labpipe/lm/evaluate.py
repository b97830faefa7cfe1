"""Stage lm_eval: the in-context learning curve of the trained LM against the Bayes-optimal loss.

For each position t >= 1 of the validation rows (the first lm.eval_sequences rows of the val split, the rows
lm_train validates on), the mean over rows of -log p(x_t | x_<t) under
  lm       the trained model (artifacts/lm/model: lm_train's best weights)
  bayes    the HMM that generated the row: hmm_train's model without ends, started from the law the
           manifest names (its start or the transition's stationary law), with the row's block permutation
           of the emissions when the data has them; next_token_log_probs is then exactly the predictive law
           of the row, the lowest loss any model can reach on average
  unigram  token frequencies of the train shards, floored with hmm.eps (hmm.evaluate.Baselines)
  bigram   p(x_t | x_{t-1}) counted on the train shards, floored likewise
Position 0 is left out: the LM has no token to predict x_0 from. The LM's excess over bayes, falling with
t, is the in-context learning; without permuted emissions most of it happens in the weights instead.

Writes artifacts/lm/eval/{icl_curve.csv, icl_curve.png, metrics.json} and logs them to MLflow.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import LlamaForCausalLM

from labpipe.config import Params, flatten
from labpipe.device import resolve_device
from labpipe.errors import InputError
from labpipe.files import atomic_path, sha256_file, write_json
from labpipe.hmm.evaluate import Baselines
from labpipe.hmm.forward_backward import next_token_log_probs
from labpipe.hmm.model import HMM
from labpipe.inputs import from_pretrained
from labpipe.lm.data import ShardDataset
from labpipe.lm.train import MODEL_DIR, open_data, shards_of_rows, validation_rows, verify_shards
from labpipe.plotting import pyplot, save_figure
from labpipe.synth.manifest import Manifest, Shard, permuted_hmm

OUT_DIR = Path("artifacts/lm/eval")
CURVES = ("lm", "bayes", "unigram", "bigram")
BASELINE_TOKENS = 1 << 24  # Baselines.fit holds its sequences in memory: fit on whole train shards up to this


def generating_hmm(manifest: Manifest) -> HMM:
    """The HMM the synthetic rows were sampled from (before any emission permutation), in float64."""
    path = Path(manifest.hmm["path"])
    if not path.exists():
        raise InputError(f"{manifest.path} was sampled from {path}, which does not exist")
    if sha256_file(path) != manifest.hmm["sha256"]:
        raise InputError(f"{path} has changed since {manifest.path} was sampled from it: rerun stage synth")
    hmm = HMM.load(path).without_ends()
    if hmm.n_symbols != manifest.vocab_size:
        raise InputError(f"{path} emits {hmm.n_symbols} symbols, {manifest.path} says {manifest.vocab_size}")
    if manifest.start == "stationary":
        hmm = HMM(hmm.stationary(), hmm.transition, hmm.end, hmm.emission)
    return hmm


def fit_baselines(train: ShardDataset, eps: float) -> tuple[Baselines, list[int]]:
    """Unigram and bigram counts of whole train shards (at least one, up to BASELINE_TOKENS tokens), and the
    indices of the shards used."""
    manifest, used, sequences = train.manifest, [], []
    for index, shard in enumerate(train.shards):
        if used and (len(sequences) + shard.sequences) * manifest.seq_length > BASELINE_TOKENS:
            break
        used.append(index)
        sequences.extend(np.asarray(manifest.open(shard)))
    return Baselines.fit(sequences, manifest.vocab_size, eps), used


def observed_ce(predictions: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(B, L-1): -log p(x_t | x_<t) for t >= 1, from (B, L-1, V) predictions of x_1 .. x_{L-1}."""
    return -predictions.gather(2, tokens[:, 1:, None])[:, :, 0].double()


def batches_within_blocks(val: ShardDataset, rows: int, batch_size: int) -> Iterator[tuple[Shard, int, np.ndarray]]:
    """(shard, its row of the batch's first row, the batch) over the first `rows` rows of the val split, in
    batches that never straddle a block: a block's rows share one emission permutation, hence one HMM."""
    manifest = val.manifest
    block = manifest.block_sequences if manifest.permute_emissions else batch_size
    for shard, start in zip(val.shards, val.starts, strict=False):
        taken = min(shard.sequences, rows - start)
        if taken <= 0:
            return
        data = manifest.open(shard)
        for block_start in range(0, taken, block):
            block_end = min(block_start + block, taken)
            for first in range(block_start, block_end, batch_size):
                yield shard, first, data[first : min(first + batch_size, block_end)]


@torch.no_grad()
def icl_curve(model: LlamaForCausalLM, hmm: HMM, baselines: Baselines, val: ShardDataset, rows: int,
              batch_size: int, device: torch.device) -> pd.DataFrame:
    """Mean cross-entropy per position t >= 1 over the first `rows` rows of the val split, for each curve."""
    manifest = val.manifest
    totals = {name: torch.zeros(manifest.seq_length - 1, dtype=torch.float64) for name in CURVES}
    model.eval()
    bar = tqdm(total=rows, desc="lm eval", unit="row")
    for shard, first, batch in batches_within_blocks(val, rows, batch_size):
        tokens = torch.from_numpy(batch.astype(np.int64))
        row_hmm = permuted_hmm(hmm, manifest.permutation(shard, first))
        logits = model(input_ids=tokens.to(device)).logits.float().cpu()
        lengths = torch.full((len(tokens),), manifest.seq_length)
        # The LM's logits at t - 1 predict x_t; the HMM's and the n-grams' log-probs at t do.
        curves = {"lm": observed_ce(F.log_softmax(logits[:, :-1], dim=-1), tokens),
                  "bayes": observed_ce(next_token_log_probs(row_hmm, tokens, lengths)[:, 1:], tokens)}
        curves |= {name: observed_ce(baselines.log_probs(name, tokens)[:, 1:], tokens)
                   for name in ("unigram", "bigram")}
        for name, ce in curves.items():
            totals[name] += ce.sum(0)
        bar.update(len(tokens))
    bar.close()
    return pd.DataFrame({"position": np.arange(1, manifest.seq_length),
                         **{name: (total / rows).numpy() for name, total in totals.items()}})


def run_eval(params: Params) -> None:
    """Stage lm_eval."""
    from labpipe.tracking import stage_run

    lm = params.lm
    device = resolve_device(lm.device, "lm.device")
    manifest, train, val = open_data(lm)
    if not (MODEL_DIR / "config.json").exists():
        raise InputError(f"no trained LM in {MODEL_DIR}: run stage lm_train first")
    model = from_pretrained(LlamaForCausalLM, MODEL_DIR, "Llama model (lm_train's)").to(device)
    if model.config.vocab_size < manifest.vocab_size:
        raise InputError(f"{MODEL_DIR} predicts {model.config.vocab_size} symbols, the data has "
                         f"{manifest.vocab_size}: retrain it on this data")
    hmm = generating_hmm(manifest)
    rows = validation_rows(lm, val)
    verify_shards(val, shards_of_rows(val, rows))
    baselines, baseline_shards = fit_baselines(train, params.hmm.eps)
    verify_shards(train, baseline_shards)

    curve = icl_curve(model, hmm, baselines, val, rows, lm.batch_size, device)
    means = {name: float(curve[name].mean()) for name in CURVES}  # rows all reach every position
    metrics = {**{f"{name}_ce": value for name, value in means.items()},
               "lm_excess_over_bayes": means["lm"] - means["bayes"],
               "lm_excess_over_bayes_last_position": float(curve.lm.iloc[-1] - curve.bayes.iloc[-1]),
               "sequences": rows}
    write_json(OUT_DIR / "metrics.json", metrics)
    with atomic_path(OUT_DIR / "icl_curve.csv") as tmp:
        curve.to_csv(tmp, index=False)
    title = (f"H={hmm.n_states}, K={manifest.vocab_size}"
             + (", permuted emissions" if manifest.permute_emissions else ""))
    plot_curve(curve, OUT_DIR / "icl_curve.png", title)

    with stage_run(params.tracking, "lm_eval", {**flatten(lm, "lm."), "hmm.eps": params.hmm.eps}) as run:
        run.set_tags({"manifest": str(manifest.path), "model": str(MODEL_DIR)})
        run.log_metrics(metrics, step=0)
        for row in curve.itertuples():
            run.log_metrics({f"icl/{name}": getattr(row, name) for name in CURVES}, step=row.position)
        for name in ("icl_curve.png", "icl_curve.csv", "metrics.json"):
            run.log_artifact(OUT_DIR / name)
        run.log_outputs([OUT_DIR])
    print("mean cross-entropy (nats): " + ", ".join(f"{name} {means[name]:.4f}" for name in CURVES)
          + f"; the LM's excess over Bayes {metrics['lm_excess_over_bayes']:.4f}")


def plot_curve(curve: pd.DataFrame, path: Path, title: str) -> None:
    figure, axis = pyplot().subplots(figsize=(6, 4))
    for name in CURVES:
        axis.plot(curve.position, curve[name], label=name, linewidth=2 if name in ("lm", "bayes") else 1)
    axis.set(xlabel="position t (tokens of context)", ylabel="cross-entropy of x_t (nats)",
             title=f"In-context learning curve, {title}")
    axis.legend()
    save_figure(figure, path)
