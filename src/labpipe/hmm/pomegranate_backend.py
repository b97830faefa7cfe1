"""The seed's backend: pomegranate's DenseHMM with Categorical emissions, made to compute in float64.

pomegranate (1.1.2) takes its working dtype from a float32 `_device` parameter that every Distribution
creates, so float64 probabilities alone fail in DenseHMM.forward (float @ double); and Categorical allocates
its statistics with torch's default dtype. `to_dense_hmm` casts the whole module, parameters and buffers,
to float64; DenseHMM.from_summaries re-allocates Categorical's statistics in float32, so the backend builds
a fresh model from the updated parameters after every M-step (em.PomegranateBackend).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from labpipe.hmm.model import HMM

if TYPE_CHECKING:
    from pomegranate.hmm import DenseHMM


def to_dense_hmm(hmm: HMM, device: torch.device | str = "cpu") -> DenseHMM:
    # Imported here: pomegranate loads numba, scikit-learn and apricot (~3 s, ~280 MB RSS), which the torch
    # backend and the stages that only read checkpoints never need.
    from pomegranate.distributions import Categorical
    from pomegranate.hmm import DenseHMM

    hmm = hmm.to(dtype=torch.float64)
    emissions = [Categorical(probs=row[None, :].clone()) for row in hmm.emission]  # one feature per state
    model = DenseHMM(emissions, edges=hmm.transition, starts=hmm.start, ends=hmm.end)
    return model.to(device=device, dtype=torch.float64)


def from_dense_hmm(model: DenseHMM) -> HMM:
    """CPU float64 parameters; pomegranate stores logs of start, transition and end."""
    hmm = HMM(
        start=model.starts.exp(),
        transition=model.edges.exp(),
        end=model.ends.exp(),
        emission=torch.cat([node.probs for node in model.distributions]),
    )
    return hmm.to(device="cpu", dtype=torch.float64)


def summarize_batch(model: DenseHMM, tokens: torch.Tensor, lengths: torch.Tensor) -> float:
    """Add a padded batch's statistics to the model's; returns the batch's log-likelihood sum.

    pomegranate takes (n, length, 1) tensors of equal-length sequences: one call per length in the batch.
    """
    total = 0.0
    for length in lengths.unique().tolist():
        sequences = tokens[lengths == length, :length, None].to(model.device)
        if length == 1:
            total += float(_summarize_single_symbols(model, sequences).sum())
        else:
            total += float(model.summarize(sequences).sum())
    return total


def _summarize_single_symbols(model: DenseHMM, sequences: torch.Tensor) -> torch.Tensor:
    """DenseHMM.summarize for sequences of length 1, which it cannot do.

    Its forward_backward reshapes the empty (n, 0, H, H) transition tensor with a -1 and raises. A
    one-symbol sequence has no transition, so its statistics are the state posterior p(z | x) ~ start * E * end
    added to the start, end and emission sums, as DenseHMM.summarize would add them.
    """
    joint = model.starts + model._emission_matrix(sequences)[:, 0] + model.ends  # (n, H) log p(x, z)
    log_likelihood = joint.logsumexp(1)
    posterior = (joint - log_likelihood[:, None]).exp()
    model._xw_starts_sum += posterior.sum(0)
    model._xw_ends_sum += posterior.sum(0)
    for state, node in enumerate(model.distributions):
        node.summarize(sequences[:, 0], sample_weight=posterior[:, state, None])
    return log_likelihood
