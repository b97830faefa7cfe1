"""A sparse crosscoder over two sources a and b (two checkpoints, or two layers) of widths d_a and d_b.

With x = [a | b] the concatenation of both sources' activations (width D = d_a + d_b) and F latents:

    f     = ReLU(sum_s a^s W_enc^s + b_enc) = ReLU(x W_enc + b_enc)           f in R^F
    x_hat = f W_dec + b_dec,  i.e.  a_hat^s = f W_dec^s + b_dec^s
    loss  = sum_s ||a^s - a_hat^s||^2 + lambda * sum_i f_i * w_i      (mean over the batch)

with w_i, by decoder_norm_in_penalty:
    none      w_i = 1
    detached  w_i = sum_s ||W_dec,i^s||, a constant of the step: the penalty's gradient reaches f (so the
              encoder) only, and the decoder learns from the reconstruction alone (the seed's "don't involve
              the decoder in the reg section")
    full      the same w_i with its gradient, lambda * f_i * W_dec,i^s / ||W_dec,i^s|| on each decoder row: the
              penalty also shrinks the decoder (the reference crosscoder's loss; the seed's "non-detach")

The per-source tensors of the usual layout, W_enc [2, d, F] and W_dec [F, 2, d], are stored concatenated:
W_enc [D, F] holds W_enc^a in its first d_a rows and W_enc^b below; W_dec [F, D] holds W_dec^a in its first
d_a columns. When d_a == d_b == d this is exactly the usual layout (W_enc.view(2, d, F), W_dec.view(F, 2, d));
when they differ it still is one matmul per side, and the per-source views are slices.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from labpipe.errors import InputError
from labpipe.inputs import load_torch, reason


class LossTerms(NamedTuple):
    loss: torch.Tensor  # mse + lambda * l1
    mse: torch.Tensor  # sum over sources and dimensions of the squared error, mean over the batch
    l1: torch.Tensor  # the sparsity penalty before lambda, mean over the batch


class Crosscoder(nn.Module):
    def __init__(self, d_a: int, d_b: int, dict_size: int):
        super().__init__()
        self.d_a, self.d_b, self.dict_size = d_a, d_b, dict_size
        width = d_a + d_b
        self.W_enc = nn.Parameter(torch.zeros(width, dict_size))
        self.b_enc = nn.Parameter(torch.zeros(dict_size))
        self.W_dec = nn.Parameter(torch.zeros(dict_size, width))
        self.b_dec = nn.Parameter(torch.zeros(width))

    @property
    def config(self) -> dict:
        return {"d_a": self.d_a, "d_b": self.d_b, "dict_size": self.dict_size}

    def sources(self) -> tuple[slice, slice]:
        """The columns of x (and of W_dec) that belong to source a and to source b."""
        return slice(0, self.d_a), slice(self.d_a, self.d_a + self.d_b)

    @torch.no_grad()
    def init_weights(self, init: str, transpose_init: bool, dec_init_norm: float, generator: torch.Generator) -> None:
        """Draw the weights; biases start at zero.

        kaiming: U(-b, b) with b = sqrt(6 / fan_in) (He uniform, ReLU gain), normal: N(0, 1 / fan_in); fan_in is
        the input width of the map: F for the decoder, D for the encoder. With dec_init_norm > 0 every decoder row
        is rescaled per source, ||W_dec,i^s|| = dec_init_norm: the penalty sum_s ||W_dec,i^s|| starts equal for all
        latents, and the lab found the number of dead latents to depend on this norm (best 0.08-0.12). With
        transpose_init the encoder starts as the decoder's transpose (after the rescaling), so that a latent reads
        along the direction it writes.
        """
        self.W_dec.copy_(_draw(init, self.W_dec.shape, fan_in=self.dict_size, generator=generator))
        if dec_init_norm > 0:
            for columns in self.sources():
                rows = self.W_dec[:, columns]
                rows.mul_(dec_init_norm / rows.norm(dim=1, keepdim=True))
        if transpose_init:
            self.W_enc.copy_(self.W_dec.T)
        else:
            self.W_enc.copy_(_draw(init, self.W_enc.shape, fan_in=self.d_a + self.d_b, generator=generator))
        self.b_enc.zero_()
        self.b_dec.zero_()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ self.W_enc + self.b_enc)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(f, x_hat) for a batch x of shape (B, D)."""
        f = self.encode(x)
        return f, self.decode(f)

    def decoder_norms(self) -> torch.Tensor:
        """(F, 2): ||W_dec,i^s|| for every latent i and source s."""
        return torch.stack([self.W_dec[:, columns].norm(dim=1) for columns in self.sources()], dim=1)

    def loss_terms(self, x: torch.Tensor, f: torch.Tensor, x_hat: torch.Tensor, l1_coef: float,
                   decoder_norm_in_penalty: str) -> LossTerms:
        """The loss of the module docstring, decoder_norm_in_penalty = none | detached | full."""
        mse = (x - x_hat).pow(2).sum(dim=1).mean()
        if decoder_norm_in_penalty == "none":
            weights = torch.ones_like(self.b_enc)
        else:
            weights = self.decoder_norms().sum(dim=1)
            if decoder_norm_in_penalty == "detached":
                weights = weights.detach()
        l1 = (f * weights).sum(dim=1).mean()
        return LossTerms(mse + l1_coef * l1, mse, l1)


def _draw(init: str, shape: torch.Size, fan_in: int, generator: torch.Generator) -> torch.Tensor:
    if init == "kaiming":
        bound = math.sqrt(6 / fan_in)
        return (torch.rand(shape, generator=generator) * 2 - 1) * bound
    if init == "normal":
        return torch.randn(shape, generator=generator) / math.sqrt(fan_in)
    raise ValueError(f"unknown crosscoder init {init!r}: use kaiming or normal")


def load_crosscoder(path: str | Path) -> tuple[Crosscoder, dict]:
    """The crosscoder of a model.pt written by crosscoder_train, and the file's whole record (scales, params)."""
    saved = load_torch(path, "labpipe crosscoder (crosscoder_train's model.pt)", keys=("model", "config"))
    try:
        model = Crosscoder(**saved["config"])
        model.load_state_dict(saved["model"])
    except (TypeError, RuntimeError) as error:
        raise InputError(f"{path}: not a usable crosscoder ({reason(error)})") from None
    return model, saved
