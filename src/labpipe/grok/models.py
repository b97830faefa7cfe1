"""Regressors of log2 m-height: a ResNet MLP and a mixture of ResNet experts gated on the code's group.

Both map features x to a raw score z, and an output head reads z as a prediction h_hat >= 1 (an m-height
is at least 1). The default head, `log2`, reads z in the log2 domain: log2 h_hat = softplus(z). It is the
seed's `1 + softplus` lower bound moved to the log scale: targets reach 2^22 in the generated data (~2^31
in the course's), which a network cannot output raw (the seed's head, h_hat = 1 + softplus(z) on the h
scale, stalled at a loss of ~46 at the default; the log2 head reaches ~1.9). The seed's head stays on
offer (`seed`) to reproduce the seed's curves. Either way the loss is (log2 h - log2 h_hat)^2, and the
seed's violation-aware term relu(log2 bound - log2 h_hat)^2 penalises predicting below a sampled codeword
height, a known lower bound on h.

forward(x) returns (z, aux): aux is the MoE's load-balancing loss (0 for the ResNet and for hard gating).
The model built by build_model carries its FeatureLayout and head, so that a pickled model (the one MLflow
logs) says how to encode a code and how to read z.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from labpipe.config import GrokParams
from labpipe.grok.features import FeatureLayout


class ResidualBlock(nn.Module):
    """Pre-norm residual MLP block: LayerNorm keeps long AdamW runs stable (the seed's choice)."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.fc2(F.relu(self.fc1(self.norm(h))))


class ResNetMLP(nn.Module):
    """Also the MoE's expert: its state dict holds weights only, so a trained ResNet loads into an expert."""

    def __init__(self, d_in: int, width: int, blocks: int):
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        self.blocks = nn.ModuleList(ResidualBlock(width) for _ in range(blocks))
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, 1)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.out(F.relu(self.norm(h))).squeeze(-1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.score(x), x.new_zeros(())


class SparseMoE(nn.Module):
    """ResNet experts routed on the gate input: the code's (n, k) pair (gate_input=nk, the seed's) or its
    (n, k, m) group (nkm), both read off the group one-hot that ends x.

    gating=soft: a learnt linear gate; the softmax over the top-k logits weights their experts, and the
    Switch-Transformer balancing loss E * sum_e f_e * p_e (f_e: share of routed slots, p_e: mean gate
    probability) keeps every expert in use. gating=hard: the i-th gate input goes to expert i mod E, so z
    is that expert's score; there is no gate to learn. All experts are evaluated and the chosen gathered:
    with a handful of small experts this is simpler and no slower than dispatching rows.
    """

    def __init__(self, layout: FeatureLayout, width: int, blocks: int, experts: int, top_k: int,
                 gate_input: str = "nk", gating: str = "soft"):
        super().__init__()
        if gating == "soft" and not 1 <= top_k <= experts:
            raise ValueError(f"top_k={top_k} must be between 1 and experts={experts}")
        keys = [(n, k) if gate_input == "nk" else (n, k, m) for n, k, m in layout.groups]
        inputs = sorted(set(keys))
        column = torch.tensor([inputs.index(key) for key in keys])  # each group's gate input
        # group one-hot @ to_gate = gate-input one-hot. Derived from the layout, so not persistent: the
        # state dict keeps only weights (checkpoints written before it existed still load).
        to_gate = F.one_hot(column, len(inputs)).float()
        self.register_buffer("to_gate", to_gate, persistent=False)
        self.experts = nn.ModuleList(ResNetMLP(layout.dim, width, blocks) for _ in range(experts))
        self.gating = gating
        if gating == "soft":
            self.gate = nn.Linear(to_gate.shape[1], experts)
            self.top_k = top_k
        else:
            self.register_buffer("expert_of_group", column % experts, persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        group_onehot = x[:, -self.to_gate.shape[0]:]
        scores = torch.stack([expert.score(x) for expert in self.experts], dim=-1)  # (B, E)
        if self.gating == "hard":
            chosen = self.expert_of_group[group_onehot.argmax(-1)]
            return scores.gather(-1, chosen.unsqueeze(-1)).squeeze(-1), x.new_zeros(())
        logits = self.gate(group_onehot @ self.to_gate)
        top_logits, top_index = logits.topk(self.top_k, dim=-1)
        weights = torch.softmax(top_logits, dim=-1)
        z = (weights * scores.gather(-1, top_index)).sum(-1)
        n_experts = logits.shape[-1]
        routed_share = F.one_hot(top_index, n_experts).float().sum(1).mean(0) / self.top_k
        mean_probability = torch.softmax(logits, dim=-1).mean(0)
        return z, n_experts * (routed_share * mean_probability).sum()


def build_model(params: GrokParams, layout: FeatureLayout) -> nn.Module:
    if params.model == "resnet":
        model = ResNetMLP(layout.dim, params.width, params.blocks)
    else:
        model = SparseMoE(layout, params.width, params.blocks, params.experts, params.top_k,
                          params.gate_input, params.gating)
    # Plain attributes, not state: a pickled model describes itself, and state dicts stay weights only.
    model.layout = layout
    model.output_head = params.output_head
    return model


def log2_prediction(z: torch.Tensor, head: str = "log2") -> torch.Tensor:
    """log2 h_hat >= 0 (h_hat >= 1): softplus(z) for the log2 head, log2(1 + softplus(z)) for the seed's."""
    if head == "log2":
        return F.softplus(z)
    if head == "seed":
        return torch.log1p(F.softplus(z)) / math.log(2)  # log1p: softplus(z) << 1 for z << 0
    raise ValueError(f"unknown output head {head!r} (log2 | seed)")


def log2_loss(z: torch.Tensor, log2_target: torch.Tensor, head: str = "log2") -> torch.Tensor:
    """Per-row (log2 h - log2 h_hat)^2."""
    return (log2_target - log2_prediction(z, head)) ** 2


def violation_penalty(log2_pred: torch.Tensor, log2_bound: torch.Tensor) -> torch.Tensor:
    """Per-row relu(log2 bound - log2 h_hat)^2: zero at or above the bound, so also where there is none
    (log2 bound = 0 <= log2 h_hat)."""
    return F.relu(log2_bound - log2_pred) ** 2
