"""What crosscoder_train logs: the lab's seed's quantities under the seed's names, as its log defines them
(seeds 000/001), and labpipe's own under other names, with their exact definitions.

Every metric is taken over a span of N tokens (rows x = [a | b]): one batch (history.csv, every log_every
steps), an epoch (epochs.csv, at each epoch's end) or the final eval rows (metrics.json). Latent i is active on
token t when f_ti > 0; n_t = latents active on token t, c_i = tokens of the span on which latent i is active,
F latents. For source s, r_t^s = ||a_t^s - a_hat_t^s||^2 and v_t^s = ||a_t^s - mu^s||^2, mu the mean of the
token's batch (of all the eval rows, for the final metrics).

The seed's names. Per token: in its log every *_pct is a count / total_neurons (12288) and mean_active is a
multiple of 1/4096 (its batch), so the counts are the n_t, taken over the batch's tokens:

    mean_active   = mean_t n_t (= l0)           mean_active_pct = mean_active / F
    max_active    = max_t n_t (the densest token)   max_active_pct = max_active / F
    min_active    = min_t n_t                   min_active_pct  = min_active / F
    total_inactive = latents active on no token of the epoch so far (history.csv: from the epoch's first
                     step through this one; epochs.csv: the whole epoch; metrics.json: the eval rows)
    total_dead_neurons = latents active on none of the last dead_window training tokens (DeadLatents)
    total_neurons = F;  pct_dead_neurons = total_dead_neurons / F        (every pct a fraction, as the seed's)
    residual      = mean_t (r_t^a + r_t^b), the loss's reconstruction term
    mean_explained_variance_s = mean_t (1 - r_t^s / v_t^s)
    mean_explained_variance   = mean_t (1 - (r_t^a + r_t^b) / (v_t^a + v_t^b))

total_inactive: the log has 0 in every line beside min_active = 0 (some token activates no latent) and 32-40
dead latents: it is neither the tokens without an active latent nor the latents silent in one batch, but a
count over a span longer than the dead window; labpipe takes the epoch. The explained variances are the
reference crosscoder's (ckkissane's, the seed's reference at dec_init_norm 0.08): per token, then the mean
over tokens. A token's joint EV is the average of its EV_a and EV_b weighted by v_t^a and v_t^b, so their
means over tokens can put the joint above both, as the seed's epochs 0 and 1 do (0.5863 > 0.5861, 0.5856); the
average (EV_a + EV_b) / 2 never can. residual = the squared error: residual / (1 - mean_explained_variance) is
16.33-16.40 in all four lines of the log, the inputs' variance per token, as it must be (with ||.|| it is not
constant: 111, 99, 88).

labpipe's names:

    explained_variance_s = 1 - sum_t r_t^s / sum_t v_t^s (pooled over the span's tokens)
    explained_variance   = 1 - sum_t (r_t^a + r_t^b) / sum_t (v_t^a + v_t^b)
    mse_s                = mean_t r_t^s                  (residual = mse_a + mse_b)
    l0                   = mean_active
    max_firing_rate      = max_i c_i / N;  min_firing_rate = min_i c_i / N   (per latent: the densest, the rarest)
    inactive_tokens      = tokens t with n_t = 0
    median_input_norm    = median_t ||x_t||;  median_error_norm = median_t ||x_t - x_hat_t||   (the seed's check
                           "on median an input has value 1.2796, we mis-predict by 1.2575"; batches and the final
                           rows only; numpy's median: the mean of the middle two for an even N)
"""

from __future__ import annotations

import numpy as np
import torch

EXTREMES = {"max_active": torch.maximum, "min_active": torch.minimum}  # combined by these; every other sum adds
# span_sums' keys: any other sum given to span_metrics is averaged over the span's tokens
SUMS = {"tokens", "active", "max_active", "min_active", "inactive_tokens", "latent_counts", "token_ev",
        "token_ev_a", "token_ev_b", "error_a", "error_b", "spread_a", "spread_b"}


@torch.no_grad()
def span_sums(x: torch.Tensor, f: torch.Tensor, x_hat: torch.Tensor, d_a: int,
              center: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The sums over the rows of x (B, d_a + d_b) that every metric of a span follows from, on x's device;
    `center` is mu (default: the batch's mean)."""
    active = f > 0
    per_token = active.sum(dim=1)
    center = x.mean(dim=0) if center is None else center
    error, spread = (x - x_hat).pow(2), (x - center).pow(2)
    r_a, r_b = error[:, :d_a].sum(dim=1), error[:, d_a:].sum(dim=1)
    v_a, v_b = spread[:, :d_a].sum(dim=1), spread[:, d_a:].sum(dim=1)
    return {"tokens": torch.full((), len(x), device=x.device), "active": per_token.sum(),
            "max_active": per_token.max(), "min_active": per_token.min(),
            "inactive_tokens": (per_token == 0).sum(), "latent_counts": active.sum(dim=0),
            "token_ev": (1 - (r_a + r_b) / (v_a + v_b)).sum(), "token_ev_a": (1 - r_a / v_a).sum(),
            "token_ev_b": (1 - r_b / v_b).sum(), "error_a": r_a.sum(), "error_b": r_b.sum(),
            "spread_a": v_a.sum(), "spread_b": v_b.sum()}


def combine(total: dict[str, torch.Tensor] | None, sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The sums of the union of two spans."""
    if total is None:
        return sums
    return {key: EXTREMES.get(key, torch.add)(total[key], value) for key, value in sums.items()}


def span_metrics(sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """The metrics of the module docstring over a span, from its sums (in float64 on the host), with the means
    over its tokens of any other sum given ("loss", "l1": batch means times the batch size)."""
    s = {key: value.detach().cpu().double() for key, value in sums.items()}
    n, counts = s["tokens"], s["latent_counts"]
    dict_size = len(counts)
    error, spread = s["error_a"] + s["error_b"], s["spread_a"] + s["spread_b"]
    values = {
        "total_inactive": (counts == 0).sum(),
        "mean_active": s["active"] / n, "mean_active_pct": s["active"] / n / dict_size,
        "max_active": s["max_active"], "max_active_pct": s["max_active"] / dict_size,
        "min_active": s["min_active"], "min_active_pct": s["min_active"] / dict_size,
        "residual": error / n,
        "mean_explained_variance": s["token_ev"] / n,
        "mean_explained_variance_a": s["token_ev_a"] / n, "mean_explained_variance_b": s["token_ev_b"] / n,
        "explained_variance": 1 - error / spread,
        "explained_variance_a": 1 - s["error_a"] / s["spread_a"],
        "explained_variance_b": 1 - s["error_b"] / s["spread_b"],
        "mse_a": s["error_a"] / n, "mse_b": s["error_b"] / n,
        "l0": s["active"] / n,
        "max_firing_rate": counts.max() / n, "min_firing_rate": counts.min() / n,
        "inactive_tokens": s["inactive_tokens"],
        **{key: value / n for key, value in s.items() if key not in SUMS},
    }
    return {key: value.item() for key, value in values.items()}


def median_norms(x: torch.Tensor, x_hat: torch.Tensor) -> dict[str, float]:
    """median_input_norm and median_error_norm over the rows of x."""
    return {"median_input_norm": median(x.norm(dim=1)), "median_error_norm": median((x - x_hat).norm(dim=1))}


def median(values: torch.Tensor) -> float:
    """numpy's median (the middle two averaged for an even count; torch.median takes the lower one)."""
    return float(np.median(values.detach().cpu().double().numpy()))


class Totals:
    """The sums of span_sums over the batches since the last reset (the epoch so far), kept on the device:
    adding a batch costs no host sync. A part of the run's checkpoints, so that a resumed epoch adds up to the
    same totals as an uninterrupted one."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.sums: dict[str, torch.Tensor] | None = None

    def add(self, sums: dict[str, torch.Tensor]) -> None:
        self.sums = combine(self.sums, sums)

    def reset(self) -> None:
        self.sums = None

    def state_dict(self) -> dict:
        return {"sums": None if self.sums is None else {k: v.cpu() for k, v in self.sums.items()}}

    def load_state_dict(self, state: dict) -> None:
        sums = state["sums"]
        self.sums = None if sums is None else {k: v.to(self.device) for k, v in sums.items()}


class DeadLatents:
    """Which latents were active on none of the last `window` training tokens.

    since_i = training tokens seen since the end of the last batch in which latent i was active (0 while it
    fires in every batch); latent i is dead when since_i >= window. Counted at batch granularity: a latent
    that fires anywhere in a batch counts as active at the batch's end, so a dead latent has certainly been
    silent for `window` tokens, and a latent silent for `window` tokens is dead at most one batch later.
    Kept on the device, updated without a host sync.
    """

    def __init__(self, dict_size: int, window: int, device: torch.device | str = "cpu"):
        self.window = window
        self.since = torch.zeros(dict_size, dtype=torch.long, device=device)

    def update(self, f: torch.Tensor) -> None:
        fired = (f > 0).any(dim=0)
        self.since = torch.where(fired, 0, self.since + f.shape[0])

    def dead(self) -> torch.Tensor:
        return self.since >= self.window

    def metrics(self) -> dict[str, float]:
        """total_dead_neurons, total_neurons and pct_dead_neurons now."""
        dead, total = int(self.dead().sum()), len(self.since)
        return {"total_dead_neurons": dead, "total_neurons": total, "pct_dead_neurons": dead / total}

    def state_dict(self) -> dict:
        return {"window": self.window, "since": self.since.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.window = state["window"]
        self.since = state["since"].to(self.since.device)
