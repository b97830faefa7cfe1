"""A categorical HMM with explicit end probabilities: the model of pomegranate's DenseHMM.

For a sequence x_1..x_L,

    p(x) = sum over paths z of  start[z_1] E[z_1, x_1]  prod_t A[z_{t-1}, z_t] E[z_t, x_t]  end[z_L],

where each state's row of A and its end probability sum to 1 together: a state either moves on or ends.
Parameters are probabilities (not logs); `state_dict` is the checkpoint format other stages load.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import torch

from labpipe.errors import InputError
from labpipe.inputs import load_torch, reason

ROW_SUM_TOLERANCE = 1e-6


@dataclass
class HMM:
    start: torch.Tensor  # (H,)
    transition: torch.Tensor  # (H, H), row i: p(z_t = j | z_{t-1} = i, the sequence goes on)
    end: torch.Tensor  # (H,), p(the sequence ends | last state i)
    emission: torch.Tensor  # (H, E)

    @property
    def n_states(self) -> int:
        return self.start.shape[0]

    @property
    def n_symbols(self) -> int:
        return self.emission.shape[1]

    @classmethod
    def random(cls, n_states: int, n_symbols: int, seed: int, dtype: torch.dtype = torch.float64) -> HMM:
        """Dirichlet(1) rows. A uniform init never breaks the symmetry between states: EM keeps them equal."""
        generator = torch.Generator().manual_seed(seed)

        def dirichlet_rows(rows: int, cols: int) -> torch.Tensor:
            draws = torch.empty(rows, cols, dtype=dtype).exponential_(generator=generator)
            return draws / draws.sum(1, keepdim=True)

        start = dirichlet_rows(1, n_states)[0]
        moves = dirichlet_rows(n_states, n_states + 1)  # a state's transitions and its end, together
        return cls(start, moves[:, :n_states], moves[:, n_states], dirichlet_rows(n_states, n_symbols))

    def validate(self) -> None:
        """ValueError naming the tensor: wrong shape, negative or NaN entries, or rows not summing to 1."""
        if self.emission.dim() != 2:
            raise InputError(f"emission: expected shape (n_states, n_symbols), got {tuple(self.emission.shape)}")
        n_states, n_symbols = self.emission.shape
        expected = {"start": (n_states,), "transition": (n_states, n_states), "end": (n_states,),
                    "emission": (n_states, n_symbols)}
        for name, shape in expected.items():
            tensor = getattr(self, name)
            if tuple(tensor.shape) != shape:
                raise InputError(f"{name}: expected shape {shape}, got {tuple(tensor.shape)}")
            if torch.isnan(tensor).any() or (tensor < 0).any():
                raise InputError(f"{name}: has negative or NaN entries")
        row_sums = {"start": self.start.sum()[None], "transition + end": self.transition.sum(1) + self.end,
                    "emission": self.emission.sum(1)}
        for name, sums in row_sums.items():
            error = (sums - 1).abs()
            if (error > ROW_SUM_TOLERANCE).any():
                row = int(error.argmax())
                raise InputError(f"{name}: row {row} sums to {float(sums[row])!r}, expected 1 (tolerance "
                                 f"{ROW_SUM_TOLERANCE})")

    def floored(self, eps: float) -> HMM:
        """Every probability at least eps, every row summing to 1.

        Each row is mixed with the uniform distribution, p -> eps + (1 - n eps) p, so the floor is exact
        (clamp-then-renormalize leaves entries just under eps). The seed used eps = 1e-14: a symbol absent
        from a minibatch must not get probability 0, or one later occurrence gives log p(x) = -inf.
        """

        def floor_rows(rows: torch.Tensor) -> torch.Tensor:
            n = rows.shape[-1]
            if n * eps >= 1:
                raise InputError(f"eps={eps} is too large for rows of {n} entries")
            return eps + (1 - n * eps) * (rows / rows.sum(-1, keepdim=True))

        moves = floor_rows(torch.cat([self.transition, self.end[:, None]], dim=1))
        return HMM(floor_rows(self.start), moves[:, :-1], moves[:, -1], floor_rows(self.emission))

    def without_ends(self) -> HMM:
        """The same chain conditioned on going on forever: each row of A divided by 1 - end, end = 0.

        Synthetic sequences of a fixed length are sampled from it, and its next_token_log_probs is then
        exactly the predictive law of those sequences (the Bayes-optimal loss an LM can reach on them).
        """
        going_on = 1 - self.end
        if (going_on <= 0).any():
            raise InputError(f"state {int(going_on.argmin())} always ends: it has no transitions to go on with")
        return HMM(self.start, self.transition / going_on[:, None], torch.zeros_like(self.end), self.emission)

    def stationary(self) -> torch.Tensor:
        """pi with pi A = pi and sum 1, for the chain without ends (least squares on the stacked system)."""
        a = self.without_ends().transition.to(torch.float64)
        n = a.shape[0]
        system = torch.cat([a.T - torch.eye(n, dtype=a.dtype), torch.ones(1, n, dtype=a.dtype)])
        target = torch.zeros(n + 1, dtype=a.dtype)
        target[-1] = 1
        pi = torch.linalg.lstsq(system, target[:, None]).solution[:, 0].clamp(min=0)
        return (pi / pi.sum()).to(self.start.dtype)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> HMM:
        return HMM(**{f.name: getattr(self, f.name).to(device=device, dtype=dtype) for f in fields(self)})

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name).detach().cpu().clone() for f in fields(self)}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> HMM:
        names = [f.name for f in fields(cls)]
        missing = [name for name in names if name not in state]
        if missing:
            raise InputError(f"HMM state dict lacks {missing}; it has {sorted(state)}")
        hmm = cls(**{name: torch.as_tensor(state[name]).cpu() for name in names})
        hmm.validate()
        return hmm

    @classmethod
    def load(cls, path: str | Path) -> HMM:
        """The HMM of a file holding {"hmm": HMM.state_dict(), ...} (hmm_train's model.pt), in float64; an
        InputError naming the file otherwise."""
        saved = load_torch(path, "labpipe HMM model (hmm_train's model.pt)", keys=("hmm",))
        try:
            return cls.from_state_dict(saved["hmm"]).to(dtype=torch.float64)
        except (InputError, TypeError, RuntimeError) as error:
            raise InputError(f"{path}: not a usable HMM ({reason(error)})") from None
