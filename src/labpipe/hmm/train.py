"""Stage hmm_train: fit a categorical HMM to a top-K token file by minibatch EM.

Reads artifacts/text/tokens/{train,test}/K{hmm.vocab_size}/{tokens.txt,vocab.json}; writes artifacts/hmm/
{model.pt, metrics.json, history.csv, plots/likelihood.png, plots/final_ce.png} and checkpoints/
epoch_XXXXXXXX.pt. model.pt holds the HMM with the best held-out log-likelihood per token (`HMM.state_dict()`
under "hmm": the contract of the stages that sample from it) and the vocabulary; it is registered as
hmm-K{hmm.vocab_size} when it beats the champion. hmm.train_unique fits on the distinct train sentences, each
once (the seed's unique runs).

Every epoch, after its M-steps, on the full test set and on the unique one (its distinct sentences, each once,
the seed's "unique test"; with hmm.seq_length > 0 both are cut into rows after deduplication, as the seed did):
  heldout_ll_per_token    sum of log p(x) (ends included) over the full test set / its tokens
  test_final_ce           mean over sequences of -log p(x_{L-1} | x_<L-1): the final token's cross-entropy
  test_unique_final_ce    the same on the unique test set
  seed_test_loss          the seed's `test-loss` formula: torch's cross_entropy applied to the final token's
                          *probabilities* as if they were logits, log sum_e exp p_e - p_{x_{L-1}}, averaged
                          over sequences (the seed averaged batch means); comparable with the lab's old runs
                          only, it is no cross-entropy (its floor is log K - 1 + small terms)
  seed_test_loss_unique   the same on the unique test set (the seed's `test-loss-unique`)
  tokens_seen             training tokens the E-steps have read since the start of the run (the seed's
                          tokens_seen): padding excluded, each sentence's final 0 included
history.csv holds these per epoch beside train_ll_per_token; MLflow gets them and the timings: epoch_seconds
(EM: E- and M-steps), eval_seconds (the held-out metrics), checkpoint_seconds (writing the epoch's
checkpoint, at its step), tokens_per_s, peak_memory_mb. Timings stay out of the files, so equal runs write
equal files.

The run lifecycle (resume, extend, hmm.init_from, checkpoints, the MLflow run, the champion) is labpipe.run's:
a killed run restarts from the newest checkpoint and ends with the same HMM as an uninterrupted one (the batch
order of epoch e is seeded with seed + e, and the backend holds nothing between epochs but its HMM). EM has
no schedule, so raising hmm.epochs continues a finished run: a run of 3 epochs extended to 5 equals a
straight 5-epoch run. hmm.init_from (a model.pt, a checkpoint, models:/hmm-K100@champion) starts EM from
that HMM instead of a random one.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from labpipe import registry
from labpipe.config import HMMParams, Params, flatten
from labpipe.device import resolve_device
from labpipe.errors import InputError
from labpipe.files import save_torch, write_json
from labpipe.hmm.em import BACKENDS, em_epoch, estimate_memory_bytes, pad_batches
from labpipe.hmm.forward_backward import log_likelihood, sequence_scores
from labpipe.hmm.model import HMM
from labpipe.plotting import pyplot, save_figure
from labpipe.run import TrainingRun, TrainState
from labpipe.text.stages import token_dir
from labpipe.text.token_file import distinct, read_token_file

OUT_DIR = Path(registry.stage("hmm_train").training.out_dir)  # artifacts/hmm
GB = 1e9
HISTORY_COLUMNS = ["epoch", "train_ll_per_token", "heldout_ll_per_token", "test_final_ce", "test_unique_final_ce",
                   "seed_test_loss", "seed_test_loss_unique", "tokens_seen"]  # history.csv: what a run computes


class HMMModule(torch.nn.Module):
    """An HMM as a torch module, the form MLflow logs and registers: forward(tokens, lengths) = log p(x).
    Its buffers are the HMM's state_dict (start, transition, end, emission): hmm.init_from reads them back.
    `vocab` (the words by id) travels with the pickled module, so hmm-sample shows a registered HMM's words."""

    def __init__(self, hmm: HMM, vocab: list[str] | None = None):
        super().__init__()
        for name, tensor in hmm.state_dict().items():
            self.register_buffer(name, tensor)
        self.vocab = vocab

    @property
    def hmm(self) -> HMM:
        return HMM(self.start, self.transition, self.end, self.emission)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return log_likelihood(self.hmm, tokens, lengths)


class EMState:
    """The EM backend as a part of the run (labpipe.run saves and restores parts by state_dict): its HMM.
    A backend holds nothing else between epochs (each epoch ends with an M-step), so loading a state dict
    rebuilds the backend from that HMM."""

    def __init__(self, h: HMMParams, device: torch.device):
        self.h, self.device = h, device
        self.start_from(HMM.random(h.hidden_states, h.vocab_size, seed=h.seed))

    def start_from(self, hmm: HMM) -> None:
        self.backend = BACKENDS[self.h.backend](hmm, self.device)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.backend.hmm.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.start_from(HMM.from_state_dict(state))

    def init_from(self, weights: dict[str, torch.Tensor]) -> None:
        """hmm.init_from: EM starts from that HMM; InputError naming the key when it is none or does not fit."""
        h, what = self.h, f"hmm.init_from={self.h.init_from}"
        try:
            hmm = HMM.from_state_dict(weights)
        except InputError as error:
            raise InputError(f"{what}: not an HMM ({error})") from None
        if (hmm.n_states, hmm.n_symbols) != (h.hidden_states, h.vocab_size):
            raise InputError(f"{what}: an HMM of {hmm.n_states} states and {hmm.n_symbols} symbols, but "
                             f"hmm.hidden_states={h.hidden_states} and hmm.vocab_size={h.vocab_size}")
        self.start_from(hmm)


def token_file(split: str, vocab_size: int) -> Path:
    return token_dir(split, vocab_size) / "tokens.txt"


def read_sequences(split: str, h: HMMParams, unique: bool = False) -> list[np.ndarray]:
    """The split's sequences: its sentences (with `unique`, each distinct one once), or their token stream in
    rows of seq_length (the tail dropped)."""
    path = token_file(split, h.vocab_size)
    if not path.exists():
        raise InputError(f"{path} does not exist: hmm.vocab_size={h.vocab_size} must be one of text.vocab_sizes "
                         "(and the tokenize stage must have run)")
    sentences = read_token_file(path, h.vocab_size)
    if unique:
        sentences = distinct(sentences)
    if h.seq_length == 0:
        return sentences
    stream = np.concatenate(sentences)
    rows = len(stream) // h.seq_length
    if rows == 0:
        raise InputError(f"{path} has {len(stream)} tokens, fewer than hmm.seq_length={h.seq_length}")
    return list(stream[: rows * h.seq_length].reshape(rows, h.seq_length))


def check_memory(h: HMMParams, max_length: int) -> int:
    """The estimated peak of one E-step; ValueError with the estimate when it exceeds the budget."""
    needed = estimate_memory_bytes(h.backend, h.hidden_states, h.vocab_size, h.batch_size, max_length)
    if needed > h.memory_budget_gb * GB:
        fits = h.batch_size
        while fits > 0 and estimate_memory_bytes(h.backend, h.hidden_states, h.vocab_size, fits,
                                                 max_length) > h.memory_budget_gb * GB:
            fits //= 2
        advice = (f"lower hmm.batch_size (about {fits} fits)" if fits
                  else "not even batch 1 fits: shorten hmm.seq_length")
        raise InputError(
            f"hmm_train would need about {needed / GB:.3g} GB for one E-step (backend {h.backend}, "
            f"H={h.hidden_states}, K={h.vocab_size}, batch {h.batch_size}, longest sequence {max_length}), "
            f"over hmm.memory_budget_gb={h.memory_budget_gb}: {advice}, use the torch backend, or raise the budget."
        )
    return needed


@torch.no_grad()
def heldout_scores(hmm: HMM, sequences: list[np.ndarray], batch_size: int, device: torch.device) -> dict:
    """Per sequence: log p(x) with ends ("log_likelihood"), the final token's -log p ("final_ce") and the seed's
    test-loss formula ("seed_loss", see the module docstring); float64 numpy arrays in the sequences' order."""
    hmm = hmm.to(device=device)
    scores = {"log_likelihood": [], "final_ce": [], "seed_loss": []}
    for tokens, lengths in pad_batches(sequences, batch_size):
        tokens, lengths = tokens.to(device), lengths.to(device)
        ll, final = sequence_scores(hmm, tokens, lengths)
        observed = final.gather(1, tokens.gather(1, (lengths - 1)[:, None]))[:, 0]  # log p(x_{L-1} | x_<L-1)
        scores["log_likelihood"].append(ll)
        scores["final_ce"].append(-observed)
        scores["seed_loss"].append(torch.logsumexp(final.exp(), dim=1) - observed.exp())
    return {name: torch.cat(values).cpu().numpy() for name, values in scores.items()}


class HMMTrainingRun(TrainingRun):
    """The shared lifecycle, with the time each checkpoint takes to write logged at its epoch (the seed's save
    time)."""

    def save_checkpoint(self) -> Path:
        started = time.perf_counter()
        path = super().save_checkpoint()
        self.log({"checkpoint_seconds": time.perf_counter() - started}, step=self.state.step)
        return path


def peak_memory_bytes(device: torch.device) -> int:
    """The accelerator's peak allocation since the last reset, or the process's RSS high-water mark."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_train(params: Params) -> None:
    """Stage hmm_train."""
    h = params.hmm
    device = resolve_device(h.device, "hmm.device")
    train, test = read_sequences("train", h, unique=h.train_unique), read_sequences("test", h)
    test_unique = read_sequences("test", h, unique=True)
    train_tokens, test_tokens = sum(map(len, train)), sum(map(len, test))
    estimate = check_memory(h, max(map(len, train)))
    em = EMState(h, device)
    inputs = [token_file("train", h.vocab_size), token_file("test", h.vocab_size)]

    with HMMTrainingRun("hmm_train", params, inputs, {"model": em}, init=lambda loaded: em.init_from(loaded[0])) \
            as run:
        run.set_tags({"device": str(device), "train_sequences": len(train), "test_sequences": len(test),
                      "test_unique_sequences": len(test_unique), "estimated_peak_gb": f"{estimate / GB:.3f}"})
        n_batches = -(-len(train) // h.batch_size)
        for epoch in run.steps("EM epochs"):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            started = time.perf_counter()
            batches = tqdm(pad_batches(train, h.batch_size, shuffle_seed=h.seed + epoch), total=n_batches,
                           desc=f"epoch {epoch}", unit="batch", leave=False)
            # EMDivergedError (NaN/inf) propagates: the last good checkpoint stays, nothing else is written.
            result = em_epoch(em.backend, batches, h.update_freq, h.eps, epoch)
            seconds = time.perf_counter() - started
            hmm = em.backend.hmm
            full, unique = (heldout_scores(hmm, sequences, h.batch_size, device) for sequences in (test, test_unique))
            previous = run.state.history[-1]["tokens_seen"] if run.state.history else 0
            record = {
                "epoch": epoch,
                # summed while the parameters change: each minibatch under the parameters of its E-step
                "train_ll_per_token": result.log_likelihood / result.n_tokens,
                "heldout_ll_per_token": float(full["log_likelihood"].sum()) / test_tokens,
                "test_final_ce": float(full["final_ce"].mean()),
                "test_unique_final_ce": float(unique["final_ce"].mean()),
                "seed_test_loss": float(full["seed_loss"].mean()),
                "seed_test_loss_unique": float(unique["seed_loss"].mean()),
                "tokens_seen": previous + result.n_tokens,
                "epoch_seconds": seconds,
                "eval_seconds": time.perf_counter() - started - seconds,
                "tokens_per_s": train_tokens / seconds,
                "peak_memory_mb": peak_memory_bytes(device) / 1e6,
            }
            run.offer_best(record["heldout_ll_per_token"], hmm.state_dict(), epoch)
            run.state.history.append(record)
            run.log({k: v for k, v in record.items() if k != "epoch"}, step=epoch)
            run.bar.set_postfix(train=f"{record['train_ll_per_token']:.4f}",
                                heldout=f"{record['heldout_ll_per_token']:.4f}",
                                final_ce=f"{record['test_final_ce']:.4f}")

        vocab = json.loads((token_dir("train", h.vocab_size) / "vocab.json").read_text())
        with run.outputs() as out:
            metrics = write_outputs(out, run.state, h, vocab)
        run.finish(HMMModule(HMM.from_state_dict(run.state.best.weights), vocab), metrics)


def write_outputs(out: Path, state: TrainState, h: HMMParams, vocab: list[str]) -> dict:
    """model.pt (the best HMM), metrics.json, history.csv and plots/{likelihood,final_ce}.png under `out`;
    returns the metrics."""
    best, history = state.best, pd.DataFrame(state.history)
    save_torch({"hmm": best.weights, "vocab": vocab, "params": flatten(h), "epoch": best.step,
                "heldout_ll_per_token": best.value}, out / "model.pt")
    final = state.history[-1]
    metrics = {
        "best_heldout_ll_per_token": best.value,
        "best_epoch": best.step,
        "final_train_ll_per_token": final["train_ll_per_token"],
        "final_heldout_ll_per_token": final["heldout_ll_per_token"],
        "final_test_final_ce": final["test_final_ce"],
        "final_test_unique_final_ce": final["test_unique_final_ce"],
        "tokens_seen": final["tokens_seen"],
        "mean_tokens_per_s": float(history.tokens_per_s.mean()),
    }
    write_json(out / "metrics.json", metrics)
    # the trajectory only: the timings (in MLflow and mean_tokens_per_s) differ between equal runs
    history[HISTORY_COLUMNS].to_csv(out / "history.csv", index=False)

    figure, axis = pyplot().subplots(figsize=(6, 4))
    axis.plot(history.epoch, history.train_ll_per_token, marker="o", label="train (during the epoch)")
    axis.plot(history.epoch, history.heldout_ll_per_token, marker="o", label="held out (after the epoch)")
    axis.set(xlabel="epoch", ylabel="log-likelihood per token",
             title=f"HMM H={h.hidden_states}, K={h.vocab_size} ({h.backend})")
    axis.legend()
    save_figure(figure, out / "plots" / "likelihood.png")

    # the seed's curves: the final token's cross-entropy on both test sets, by epoch and by tokens seen
    figure, axes = pyplot().subplots(1, 2, figsize=(10, 4), sharey=True)
    for axis, x, label in ((axes[0], history.epoch, "epoch"), (axes[1], history.tokens_seen, "training tokens seen")):
        axis.plot(x, history.test_final_ce, marker="o", label="full test set")
        axis.plot(x, history.test_unique_final_ce, marker="o", label="unique test set")
        axis.set(xlabel=label)
    axes[0].set(ylabel="final-token cross-entropy (nats)")
    axes[1].legend()
    figure.suptitle(f"HMM H={h.hidden_states}, K={h.vocab_size}" + (", trained on unique sentences"
                                                                    if h.train_unique else ""))
    save_figure(figure, out / "plots" / "final_ce.png")
    return metrics
