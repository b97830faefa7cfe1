"""Categorical HMMs with end probabilities, trained by minibatch EM with a torch or a pomegranate backend."""

from labpipe.hmm.em import (
    BACKENDS,
    Backend,
    EMDivergedError,
    EpochResult,
    PomegranateBackend,
    TorchBackend,
    em_epoch,
    estimate_memory_bytes,
    pad_batches,
)
from labpipe.hmm.forward_backward import SufficientStats, expected_counts, log_likelihood, m_step, next_token_log_probs
from labpipe.hmm.model import HMM
from labpipe.hmm.pomegranate_backend import from_dense_hmm, to_dense_hmm

__all__ = [
    "BACKENDS",
    "HMM",
    "Backend",
    "EMDivergedError",
    "EpochResult",
    "PomegranateBackend",
    "SufficientStats",
    "TorchBackend",
    "em_epoch",
    "estimate_memory_bytes",
    "expected_counts",
    "from_dense_hmm",
    "log_likelihood",
    "m_step",
    "next_token_log_probs",
    "pad_batches",
    "to_dense_hmm",
]
