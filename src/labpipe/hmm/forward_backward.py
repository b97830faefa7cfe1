"""Scaled forward-backward on padded batches: the `torch` backend's E-step, in O(B L H) memory.

A batch is `tokens (B, L)` (long; the padding value is arbitrary) and `lengths (B,)`, each >= 1. The time
loops run over the padded length; a sequence that has ended simply carries its last state forward, so
padding changes nothing.

Scaling (Rabiner): alpha_t is the filtered posterior p(z_t | x_<=t), and c_t = p(x_t | x_<t, not ended),
so log p(x) = sum_t log c_t + log(alpha_L . end). Backward messages are divided by the same c_t and by
that last factor, which makes alpha_t * beta_t the posterior p(z_t | x) directly.

pomegranate's forward_backward materializes every expected transition as a (B, L, H, H) tensor (the lab's
243 GiB OOM at H = 500); here each step adds an (H, B) @ (B, H) product into one (H, H) accumulator.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import NamedTuple

import torch

from labpipe.hmm.model import HMM


@dataclass
class SufficientStats:
    """Expected counts under the posterior over hidden paths, summed over sequences."""

    start: torch.Tensor  # (H,) expected first states
    transition: torch.Tensor  # (H, H) expected moves i -> j
    end: torch.Tensor  # (H,) expected last states
    emission: torch.Tensor  # (H, E) expected emissions of each symbol by each state
    log_likelihood: torch.Tensor  # () sum of log p(x) over the sequences
    n_sequences: int
    n_tokens: int

    @classmethod
    def zeros(cls, n_states: int, n_symbols: int, dtype: torch.dtype = torch.float64,
              device: torch.device | str | None = None) -> SufficientStats:
        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        return cls(zeros(n_states), zeros(n_states, n_states), zeros(n_states), zeros(n_states, n_symbols),
                   zeros(), n_sequences=0, n_tokens=0)

    def __add__(self, other: SufficientStats) -> SufficientStats:
        return SufficientStats(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def finite(self) -> bool:
        tensors = (self.start, self.transition, self.end, self.emission, self.log_likelihood)
        return all(bool(torch.isfinite(t).all()) for t in tensors)


class _Forward(NamedTuple):
    alphas: torch.Tensor  # (L, B, H) filtered posteriors, time-major; a finished sequence repeats its last
    scales: torch.Tensor  # (L, B) c_t, 1 after the end
    valid: torch.Tensor  # (B, L) position t < length
    symbols: torch.Tensor  # (B, L) tokens with padding replaced by 0, safe to index with


def _forward(hmm: HMM, tokens: torch.Tensor, lengths: torch.Tensor) -> _Forward:
    batch, max_length = tokens.shape
    if lengths.shape != (batch,) or lengths.min() < 1 or lengths.max() > max_length:
        raise ValueError(f"lengths must be (B,) = ({batch},) in [1, {max_length}], got {lengths.tolist()}")
    valid = torch.arange(max_length, device=tokens.device) < lengths[:, None]
    if ((tokens < 0) | (tokens >= hmm.n_symbols))[valid].any():
        raise ValueError(f"tokens must lie in [0, {hmm.n_symbols}) within each sequence's length")
    symbols = torch.where(valid, tokens, 0)
    emission_by_symbol = hmm.emission.T  # (E, H): row x is p(x | each state)

    alphas = hmm.start.new_empty(max_length, batch, hmm.n_states)
    scales = hmm.start.new_ones(max_length, batch)
    alpha = hmm.start.expand(batch, -1)
    for t in range(max_length):
        predicted = hmm.start.expand(batch, -1) if t == 0 else alpha @ hmm.transition
        joint = predicted * emission_by_symbol[symbols[:, t]]
        scale = joint.sum(1)
        alpha = torch.where(valid[:, t, None], joint / scale[:, None], alpha)
        scales[t] = torch.where(valid[:, t], scale, 1)
        alphas[t] = alpha
    return _Forward(alphas, scales, valid, symbols)


def log_likelihood(hmm: HMM, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B,) log p(x) of each sequence, ends included."""
    forward = _forward(hmm, tokens, lengths)
    return forward.scales.log().sum(0) + (forward.alphas[-1] @ hmm.end).log()


def expected_counts(hmm: HMM, tokens: torch.Tensor, lengths: torch.Tensor) -> SufficientStats:
    """The E-step: posterior expected counts of the batch, and its log-likelihood."""
    alphas, scales, valid, symbols = _forward(hmm, tokens, lengths)
    last_alpha = alphas[-1]  # each sequence's alpha at its own last position (carried through the padding)
    evidence = last_alpha @ hmm.end  # p(x) / prod_t c_t
    end_counts = last_alpha * hmm.end / evidence[:, None]
    log_likelihood = scales.log().sum() + evidence.log().sum()

    # beta_t(i) = p(x_>t, end | z_t = i) / (p(x) / prod_{s<=t} c_s), so that alpha_t * beta_t = p(z_t = i | x).
    beta = hmm.end / evidence[:, None]  # at each sequence's last position
    emission_by_symbol = hmm.emission.T
    transition_counts = torch.zeros_like(hmm.transition)
    for t in range(alphas.shape[0] - 1, 0, -1):
        alphas[t] *= beta * valid[:, t, None]  # now p(z_t | x), 0 at padding; alphas[t] was last needed at t + 1
        # p(z_{t-1} = i, z_t = j | x) = alphas[t - 1](i) A(i, j) message(j); no move into a padded position
        message = emission_by_symbol[symbols[:, t]] * beta / scales[t, :, None] * valid[:, t, None]
        transition_counts += alphas[t - 1].T @ message
        beta = torch.where(valid[:, t, None], message @ hmm.transition.T, beta)
    alphas[0] *= beta
    posteriors = alphas  # (L, B, H)

    emission_counts = hmm.emission.new_zeros(hmm.n_symbols, hmm.n_states)
    emission_counts.index_add_(0, symbols.T.reshape(-1), posteriors.reshape(-1, hmm.n_states))
    return SufficientStats(
        start=posteriors[0].sum(0),
        transition=transition_counts * hmm.transition,
        end=end_counts.sum(0),
        emission=emission_counts.T,
        log_likelihood=log_likelihood,
        n_sequences=int(tokens.shape[0]),
        n_tokens=int(lengths.sum()),
    )


def m_step(stats: SufficientStats, eps: float) -> HMM:
    """Normalized counts (a state's moves and its end together, like pomegranate's from_summaries), floored."""
    leaving = stats.transition.sum(1) + stats.end
    hmm = HMM(
        start=stats.start / stats.start.sum(),
        transition=stats.transition / leaving[:, None],
        end=stats.end / leaving,
        emission=stats.emission / stats.emission.sum(1, keepdim=True),
    )
    return hmm.floored(eps)


def next_token_log_probs(hmm: HMM, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, L, E): log p(x_t = e | x_<t, the sequence goes on to a t-th symbol), NaN at padded positions.

    The state after x_<t is alpha_{t-1} @ A (start at t = 0); its mass is 1 - p(end now | x_<t), and it is
    renormalized: this is the distribution of the next symbol given that there is one, which is what a
    cross-entropy against the observed x_t measures. Position L-1 is the final token's prediction.
    """
    alphas, _, valid, _ = _forward(hmm, tokens, lengths)
    predicted = torch.cat([hmm.start.expand(1, alphas.shape[1], -1), alphas[:-1] @ hmm.transition])
    predicted = predicted / predicted.sum(-1, keepdim=True)
    log_probs = (predicted @ hmm.emission).log().transpose(0, 1)
    return log_probs.masked_fill(~valid[:, :, None], float("nan"))


def sequence_scores(hmm: HMM, tokens: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass: (B,) log p(x) with ends, and (B, E) log p(x_{L-1} = e | x_<L-1, a symbol follows), the
    final token's prediction (row L-1 of next_token_log_probs) without the (B, L, E) tensor of every position."""
    alphas, scales, _, _ = _forward(hmm, tokens, lengths)
    log_likelihood = scales.log().sum(0) + (alphas[-1] @ hmm.end).log()
    last = lengths - 1
    before = alphas[(last - 1).clamp(min=0), torch.arange(len(lengths), device=lengths.device)]  # alpha_{L-2}
    predicted = torch.where((last > 0)[:, None], before @ hmm.transition, hmm.start)
    predicted = predicted / predicted.sum(-1, keepdim=True)
    return log_likelihood, (predicted @ hmm.emission).log()
