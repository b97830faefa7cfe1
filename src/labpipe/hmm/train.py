"""Stage hmm_train: fit a categorical HMM to a top-K token file by minibatch EM.

Reads artifacts/text/tokens/{train,test}/K{hmm.vocab_size}/tokens.txt; writes artifacts/hmm/{model.pt,
metrics.json, history.csv, plots/likelihood.png}. model.pt holds the HMM with the best held-out
log-likelihood per token (`HMM.state_dict()` under "hmm": the contract of the stages that sample from it).

Every `checkpoint_every` epochs the HMM, the history and the MLflow run id are written atomically; a killed
run resumes from the newest checkpoint whose fingerprint (params, token files, this package's code) matches,
and ends where an uninterrupted run would: the batch order of epoch e is seeded with seed + e.
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

from labpipe import checkpoint
from labpipe.config import HMMParams, Params, flatten
from labpipe.device import resolve_device
from labpipe.errors import InputError
from labpipe.files import atomic_path, write_json
from labpipe.hmm.em import BACKENDS, em_epoch, estimate_memory_bytes, pad_batches
from labpipe.hmm.forward_backward import log_likelihood
from labpipe.hmm.model import HMM
from labpipe.plotting import pyplot, save_figure
from labpipe.text.stages import LINE, token_dir
from labpipe.text.token_file import read_token_file

OUT_DIR = Path("artifacts/hmm")
CHECKPOINTS = OUT_DIR / "checkpoints"
GB = 1e9


def registered_model_name(vocab_size: int) -> str:
    """One registered model per vocabulary: log-likelihoods over different vocabularies do not compare."""
    return f"hmm-K{vocab_size}"


class HMMModule(torch.nn.Module):
    """An HMM as a torch module, the form MLflow logs and registers: forward(tokens, lengths) = log p(x)."""

    def __init__(self, hmm: HMM):
        super().__init__()
        for name, tensor in hmm.state_dict().items():
            self.register_buffer(name, tensor)

    @property
    def hmm(self) -> HMM:
        return HMM(self.start, self.transition, self.end, self.emission)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return log_likelihood(self.hmm, tokens, lengths)


def token_file(split: str, vocab_size: int) -> Path:
    return token_dir(split, vocab_size) / "tokens.txt"


def read_sequences(split: str, h: HMMParams) -> list[np.ndarray]:
    """The split's sequences: its sentences, or its token stream in rows of seq_length (the tail dropped)."""
    path = token_file(split, h.vocab_size)
    if not path.exists():
        raise InputError(f"{path} does not exist: hmm.vocab_size={h.vocab_size} must be one of text.vocab_sizes "
                         "(and the tokenize stage must have run)")
    sentences = read_token_file(path, h.vocab_size)
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


def heldout_log_likelihood(hmm: HMM, sequences: list[np.ndarray], batch_size: int, device: torch.device) -> float:
    """Sum of log p(x) over the sequences (ends included)."""
    hmm = hmm.to(device=device)
    return sum(float(log_likelihood(hmm, tokens.to(device), lengths.to(device)).sum())
               for tokens, lengths in pad_batches(sequences, batch_size))


def peak_memory_bytes(device: torch.device) -> int:
    """The accelerator's peak allocation since the last reset, or the process's RSS high-water mark."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_train(params: Params) -> None:
    """Stage hmm_train."""
    from labpipe.tracking import register_if_better, stage_run

    h = params.hmm
    device = resolve_device(h.device)
    train, test = read_sequences("train", h), read_sequences("test", h)
    train_tokens, test_tokens = sum(map(len, train)), sum(map(len, test))
    estimate = check_memory(h, max(map(len, train)))

    backend = BACKENDS[h.backend](HMM.random(h.hidden_states, h.vocab_size, seed=h.seed), device)
    state = {"epoch": 0, "history": [], "best": None, "run_id": None}
    fp = checkpoint.fingerprint(h, [token_file("train", h.vocab_size), token_file("test", h.vocab_size)],
                                Path(__file__).parent)
    saved = checkpoint.resume(CHECKPOINTS, fp)
    if saved is not None:
        backend = BACKENDS[h.backend](HMM.from_state_dict(saved["hmm"]), device)
        state = saved["state"]

    with stage_run(params.tracking, LINE, "hmm_train", flatten(h, "hmm."), state["run_id"]) as run:
        state["run_id"] = run.run_id
        run.set_tags({"device": str(device), "train_sequences": len(train), "test_sequences": len(test),
                      "estimated_peak_gb": f"{estimate / GB:.3f}"})
        n_batches = -(-len(train) // h.batch_size)
        bar = tqdm(range(state["epoch"] + 1, h.epochs + 1), desc="EM epochs", unit="epoch",
                   initial=state["epoch"], total=h.epochs)
        for epoch in bar:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            started = time.perf_counter()
            batches = tqdm(pad_batches(train, h.batch_size, shuffle_seed=h.seed + epoch), total=n_batches,
                           desc=f"epoch {epoch}", unit="batch", leave=False)
            # EMDivergedError (NaN/inf) propagates: the last good checkpoint stays, nothing else is written.
            result = em_epoch(backend, batches, h.update_freq, h.eps, epoch)
            seconds = time.perf_counter() - started
            hmm = backend.hmm
            record = {
                "epoch": epoch,
                # summed while the parameters change: each minibatch under the parameters of its E-step
                "train_ll_per_token": result.log_likelihood / result.n_tokens,
                "heldout_ll_per_token": heldout_log_likelihood(hmm, test, h.batch_size, device) / test_tokens,
                "epoch_seconds": seconds,
                "tokens_per_s": train_tokens / seconds,
                "peak_memory_mb": peak_memory_bytes(device) / 1e6,
            }
            state["history"].append(record)
            if state["best"] is None or record["heldout_ll_per_token"] > state["best"]["heldout_ll_per_token"]:
                state["best"] = {"epoch": epoch, "heldout_ll_per_token": record["heldout_ll_per_token"],
                                 "hmm": hmm.state_dict()}
            run.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=epoch)
            bar.set_postfix(train=f"{record['train_ll_per_token']:.4f}",
                            heldout=f"{record['heldout_ll_per_token']:.4f}")
            state["epoch"] = epoch
            if epoch % h.checkpoint_every == 0 or epoch == h.epochs:
                checkpoint.save(CHECKPOINTS, epoch, {"fingerprint": fp, "hmm": hmm.state_dict(), "state": state},
                                keep=h.keep_checkpoints)

        write_outputs(state, h)
        run.log_artifact(OUT_DIR / "plots" / "likelihood.png", "plots")
        run.log_artifact(OUT_DIR / "metrics.json")
        run.log_outputs([OUT_DIR / "model.pt", OUT_DIR / "metrics.json", OUT_DIR / "history.csv", OUT_DIR / "plots"])
        best = state["best"]
        name = registered_model_name(h.vocab_size)
        model = HMMModule(HMM.from_state_dict(best["hmm"]))
        version = register_if_better(run.log_torch_model(model), name, "heldout_ll_per_token",
                                     best["heldout_ll_per_token"], lower_is_better=False)
        run.set_tags({"champion": version is not None})
        print(f"best held-out log-likelihood {best['heldout_ll_per_token']:.4f} per token at epoch {best['epoch']}; "
              + (f"registered {name} v{version.version} as champion" if version else "the current champion stays"))


def write_outputs(state: dict, h: HMMParams) -> None:
    best, history = state["best"], pd.DataFrame(state["history"])
    vocab = json.loads((token_dir("train", h.vocab_size) / "vocab.json").read_text())
    with atomic_path(OUT_DIR / "model.pt") as tmp:
        torch.save({"hmm": best["hmm"], "vocab": vocab, "params": flatten(h), "epoch": best["epoch"],
                    "heldout_ll_per_token": best["heldout_ll_per_token"]}, tmp)
    final = state["history"][-1]
    write_json(OUT_DIR / "metrics.json", {
        "best_heldout_ll_per_token": best["heldout_ll_per_token"],
        "best_epoch": best["epoch"],
        "final_train_ll_per_token": final["train_ll_per_token"],
        "final_heldout_ll_per_token": final["heldout_ll_per_token"],
        "mean_tokens_per_s": float(history.tokens_per_s.mean()),
    })
    with atomic_path(OUT_DIR / "history.csv") as tmp:
        history.to_csv(tmp, index=False)

    figure, axis = pyplot().subplots(figsize=(6, 4))
    axis.plot(history.epoch, history.train_ll_per_token, marker="o", label="train (during the epoch)")
    axis.plot(history.epoch, history.heldout_ll_per_token, marker="o", label="held out (after the epoch)")
    axis.set(xlabel="epoch", ylabel="log-likelihood per token",
             title=f"HMM H={h.hidden_states}, K={h.vocab_size} ({h.backend})")
    axis.legend()
    save_figure(figure, OUT_DIR / "plots" / "likelihood.png")
