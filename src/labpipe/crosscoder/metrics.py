"""What crosscoder_train logs, under the names of the lab's seed, with their exact definitions.

A latent i is *active* on a token (a row of the batch) when f_i > 0. For a batch of B tokens:

    count_i          = number of tokens of the batch on which latent i is active         (per latent)
    mean_active      = mean_i count_i;  mean_active_pct = mean_active / B                (= L0 / F)
    max_active       = max_i count_i;   max_active_pct  = max_active / B  (the densest latent's firing rate)
    min_active       = min_i count_i;   min_active_pct  = min_active / B
    total_inactive   = number of tokens of the batch on which no latent is active
    l0               = mean over tokens of the number of active latents
    total_dead_neurons = latents active on none of the last dead_window tokens (see DeadLatents)
    total_neurons    = F;  pct_dead_neurons = total_dead_neurons / F   (a fraction, as the seed's)

(The seed's own log has min_active = 0 with total_inactive = 0 and 32 dead latents in the same line, which
these per-latent counts and the per-token total_inactive reproduce; "pct" metrics are fractions in [0, 1].)

Explained variance of source s over a batch, with mean(a^s) the batch mean:

    EV_s = 1 - sum_rows ||a^s - a_hat^s||^2 / sum_rows ||a^s - mean(a^s)||^2
    mean_explained_variance = (EV_a + EV_b) / 2
"""

from __future__ import annotations

import torch


def explained_variance(x: torch.Tensor, x_hat: torch.Tensor, d_a: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(EV_a, EV_b) over the rows of x (B, d_a + d_b); see the module docstring."""
    values = []
    for columns in (slice(0, d_a), slice(d_a, None)):
        a, a_hat = x[:, columns], x_hat[:, columns]
        residual = (a - a_hat).pow(2).sum()
        total = (a - a.mean(dim=0)).pow(2).sum()
        values.append(1 - residual / total)
    return values[0], values[1]


def activity(f: torch.Tensor) -> dict[str, torch.Tensor]:
    """The seed's activity counts of one batch of latent activations f (B, F), as 0-d tensors."""
    active = f > 0
    tokens = active.shape[0]
    count = active.sum(dim=0)  # per latent: tokens that activate it
    return {
        "total_inactive": (~active.any(dim=1)).sum(),
        "mean_active": count.float().mean(),
        "mean_active_pct": count.float().mean() / tokens,
        "max_active": count.max(),
        "max_active_pct": count.max() / tokens,
        "min_active": count.min(),
        "min_active_pct": count.min() / tokens,
        "l0": active.sum(dim=1).float().mean(),
    }


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

    def state_dict(self) -> dict:
        return {"window": self.window, "since": self.since.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.window = state["window"]
        self.since = state["since"].to(self.since.device)


@torch.no_grad()
def batch_metrics(x: torch.Tensor, f: torch.Tensor, x_hat: torch.Tensor, d_a: int, dead: DeadLatents,
                  **extra: torch.Tensor) -> dict[str, float]:
    """Every activity and reconstruction metric of one batch, and the 0-d tensors `extra` (loss terms...), with a
    single device-to-host transfer."""
    ev_a, ev_b = explained_variance(x, x_hat, d_a)
    dict_size = f.shape[1]
    n_dead = dead.dead().sum()
    values = {
        **activity(f),
        "total_dead_neurons": n_dead,
        "total_neurons": torch.tensor(dict_size),
        "pct_dead_neurons": n_dead / dict_size,
        "mean_explained_variance": (ev_a + ev_b) / 2,
        "mean_explained_variance_a": ev_a,
        "mean_explained_variance_b": ev_b,
        **extra,
    }
    stacked = torch.stack([v.detach().to(device=x.device, dtype=torch.float32) for v in values.values()]).tolist()
    return dict(zip(values, stacked, strict=True))
