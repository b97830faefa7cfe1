"""Minibatch EM (Baum-Welch) over padded batches, with the torch or the pomegranate backend.

Both backends run the same algorithm: E-step statistics accumulate over `update_freq` minibatches (a whole
epoch when it is 0), then an M-step normalizes them and floors every probability at eps (HMM.floored). Given
the same initial parameters and batches they give the same log-likelihoods and parameters, to rounding.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from labpipe.errors import UserError
from labpipe.hmm.forward_backward import SufficientStats, expected_counts, m_step
from labpipe.hmm.model import HMM
from labpipe.hmm.pomegranate_backend import from_dense_hmm, summarize_batch, to_dense_hmm

Batch = tuple[torch.Tensor, torch.Tensor]  # tokens (B, L) long, lengths (B,) long


class EMDivergedError(UserError, RuntimeError):
    exit_code = 1


class Backend(Protocol):
    @property
    def hmm(self) -> HMM:
        """The current parameters, on the CPU in float64."""

    def summarize(self, batch: Batch) -> float:
        """Accumulate the E-step statistics of one minibatch; returns its log-likelihood sum."""

    def statistics_finite(self) -> bool:
        """Whether the statistics accumulated since the last update are free of NaN and inf."""

    def update(self, eps: float) -> None:
        """M-step from the accumulated statistics, floored at eps; then reset the statistics."""


class TorchBackend:
    def __init__(self, hmm: HMM, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self._hmm = hmm.to(device=self.device, dtype=torch.float64)
        self._stats = self._no_stats()

    def _no_stats(self) -> SufficientStats:
        return SufficientStats.zeros(self._hmm.n_states, self._hmm.n_symbols, device=self.device)

    @property
    def hmm(self) -> HMM:
        return self._hmm.to(device="cpu")

    def summarize(self, batch: Batch) -> float:
        tokens, lengths = (tensor.to(self.device) for tensor in batch)
        stats = expected_counts(self._hmm, tokens, lengths)
        self._stats = self._stats + stats
        return float(stats.log_likelihood)

    def statistics_finite(self) -> bool:
        return self._stats.finite()

    def update(self, eps: float) -> None:
        self._hmm = m_step(self._stats, eps)
        self._stats = self._no_stats()


class PomegranateBackend:
    def __init__(self, hmm: HMM, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self._model = to_dense_hmm(hmm, self.device)

    @property
    def hmm(self) -> HMM:
        return from_dense_hmm(self._model)

    def summarize(self, batch: Batch) -> float:
        return summarize_batch(self._model, *batch)

    def statistics_finite(self) -> bool:
        sums = [self._model._xw_sum, self._model._xw_starts_sum, self._model._xw_ends_sum]
        sums += [s for node in self._model.distributions for s in (node._w_sum, node._xw_sum)]
        return all(bool(torch.isfinite(s).all()) for s in sums)

    def update(self, eps: float) -> None:
        self._model.from_summaries()
        # A fresh model: float64 statistics again (see pomegranate_backend), and the same floor as torch's.
        self._model = to_dense_hmm(from_dense_hmm(self._model).floored(eps), self.device)


BACKENDS: dict[str, type[TorchBackend] | type[PomegranateBackend]] = {
    "torch": TorchBackend,
    "pomegranate": PomegranateBackend,
}


@dataclass(frozen=True)
class EpochResult:
    log_likelihood: float  # sum over the epoch's minibatches, each under the parameters of its E-step
    n_tokens: int
    n_sequences: int


def em_epoch(backend: Backend, batches: Iterable[Batch], update_freq: int, eps: float, epoch: int) -> EpochResult:
    """One pass over the batches: an M-step every `update_freq` batches and at the end of the epoch (only there
    when update_freq is 0: full-batch EM, the seed's "update_freq-all").

    Raises EMDivergedError naming the epoch and batch as soon as a batch's log-likelihood or the accumulated
    statistics stop being finite, before they reach an update: the caller keeps its last good checkpoint.
    """
    log_likelihood, n_tokens, n_sequences, pending = 0.0, 0, 0, 0
    for index, (tokens, lengths) in enumerate(batches):
        batch_log_likelihood = backend.summarize((tokens, lengths))
        if not (math.isfinite(batch_log_likelihood) and backend.statistics_finite()):
            raise EMDivergedError(f"EM diverged in epoch {epoch}, batch {index}: NaN or inf in the log-likelihood "
                                  f"({batch_log_likelihood}) or in the accumulated statistics")
        log_likelihood += batch_log_likelihood
        n_tokens += int(lengths.sum())
        n_sequences += len(lengths)
        pending += 1
        if pending == update_freq:  # never when 0
            backend.update(eps)
            pending = 0
    if pending:
        backend.update(eps)
    return EpochResult(log_likelihood, n_tokens, n_sequences)


def estimate_memory_bytes(backend_name: str, n_states: int, n_symbols: int, batch_size: int, max_length: int,
                          dtype_bytes: int = 8) -> int:
    """Peak memory of one E-step on one minibatch of B sequences of length L, beyond the interpreter.

    pomegranate: DenseHMM.forward_backward builds t = f_ + b_ + edges, a (B, L-1, H, H) tensor, while the sum
    f_ + b_ is still alive, then logsumexp over L makes another before t is freed: 2 such tensors at the peak,
    next to its (B, L, H) forward, backward and posterior tensors. It summarizes one length at a time, so with
    mixed lengths this is an upper bound. bench/hmm_em.py: within 2% of the measured rise in RSS.
    torch: the (L, B, H) filtered posteriors, per-step (B, H) messages, (H, H) and (H, E) counts; the
    measured rise in RSS adds ~10-20 MB of one-off library state on the CPU.
    Both: the (B, L) int64 tokens and their masks.
    """
    h, e, b, length = n_states, n_symbols, batch_size, max_length
    if backend_name == "pomegranate":
        floats = 2 * b * (length - 1) * h * h + 4 * b * length * h + 2 * h * e + 3 * h * h
    elif backend_name == "torch":
        floats = b * length * h + 6 * b * h + 2 * h * e + 3 * h * h
    else:
        raise ValueError(f"unknown backend {backend_name!r}: one of {sorted(BACKENDS)}")
    return floats * dtype_bytes + 3 * b * length * 8


def pad_batches(sequences: list[np.ndarray], batch_size: int, shuffle_seed: int | None = None) -> Iterator[Batch]:
    """(tokens, lengths) minibatches in order, or in a seeded shuffled order; padded with 0 to each batch's max."""
    order = np.arange(len(sequences))
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(len(sequences))
    for first in range(0, len(order), batch_size):
        chosen = [np.asarray(sequences[i], dtype=np.int64) for i in order[first:first + batch_size]]
        lengths = torch.tensor([len(s) for s in chosen])
        if lengths.min() < 1:
            raise ValueError("empty sequence: an HMM sequence has at least one symbol")
        tokens = torch.zeros(len(chosen), int(lengths.max()), dtype=torch.long)
        for row, sequence in enumerate(chosen):
            tokens[row, :len(sequence)] = torch.from_numpy(sequence)
        yield tokens, lengths
