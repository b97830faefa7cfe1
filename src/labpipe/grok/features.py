"""How a code becomes the regressor's input: P zero-padded to max_k x max_r and scaled, then a one-hot group.

The layout is fixed by the training data and travels with the model (model.pt and the model MLflow logs), so
that a code is encoded the same way when a trained model predicts its height (labpipe.grok.predict).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import torch

from labpipe.errors import InputError


@dataclasses.dataclass(frozen=True)
class FeatureLayout:
    groups: tuple[tuple[int, int, int], ...]  # the (n, k, m) groups of the training data, sorted
    max_k: int
    max_r: int  # the largest n - k
    p_scale: float  # the largest |P| entry of the training data

    @property
    def dim(self) -> int:
        return self.max_k * self.max_r + len(self.groups)

    @classmethod
    def from_dict(cls, saved: dict) -> FeatureLayout:
        return cls(tuple(tuple(int(v) for v in g) for g in saved["groups"]), int(saved["max_k"]),
                   int(saved["max_r"]), float(saved["p_scale"]))


@dataclasses.dataclass
class Split:
    x: torch.Tensor  # (N, dim) float32; the last len(groups) columns are the group one-hot
    group: torch.Tensor  # (N,) long
    log2_h: torch.Tensor  # (N,) float32
    log2_bound: torch.Tensor  # (N,) float32: log2 of the sampled lower bound (0 where there is none)
    excluded_infinite: int  # rows with h = inf (m >= minimum distance) left out


def make_layout(frame: pd.DataFrame) -> FeatureLayout:
    groups = tuple(sorted({(int(n), int(k), int(m)) for n, k, m in zip(frame.n, frame.k, frame.m, strict=True)}))
    p_scale = max(float(np.abs(np.concatenate(frame.P.to_numpy())).max()), 1e-12)
    return FeatureLayout(groups, max(k for _, k, _ in groups), max(n - k for n, k, _ in groups), p_scale)


def features(frame: pd.DataFrame, layout: FeatureLayout) -> tuple[np.ndarray, np.ndarray]:
    """(x, group index) of every row; a group the layout does not hold is an InputError naming it."""
    index_of = {g: i for i, g in enumerate(layout.groups)}
    keys = [(int(n), int(k), int(m)) for n, k, m in zip(frame.n, frame.k, frame.m, strict=True)]
    for n, k, m in dict.fromkeys(key for key in keys if key not in index_of):
        known = ", ".join(f"({n}, {k}, {m})" for n, k, m in layout.groups)
        raise InputError(f"group n={n} k={k} m={m} does not occur in the model's training data ({known})")
    group = np.array([index_of[key] for key in keys], dtype=np.int64)
    x = np.zeros((len(frame), layout.dim), dtype=np.float32)
    cells = layout.max_k * layout.max_r
    for (n, k), rows in frame.groupby(["n", "k"]).indices.items():  # one (n, k) shape at a time, vectorised
        padded = np.zeros((len(rows), layout.max_k, layout.max_r), dtype=np.float32)
        padded[:, :k, : n - k] = np.stack(frame.P.to_numpy()[rows]).reshape(len(rows), k, n - k) / layout.p_scale
        x[rows, :cells] = padded.reshape(len(rows), cells)
    x[np.arange(len(frame)), cells + group] = 1.0
    return x, group


def encode(frame: pd.DataFrame, layout: FeatureLayout) -> Split:
    """The rows with a finite height, as training and evaluation see them."""
    finite = frame[np.isfinite(frame.height)]
    x, group = features(finite, layout)
    bound = finite["bound"].to_numpy() if "bound" in finite else np.ones(len(finite))
    return Split(
        torch.from_numpy(x),
        torch.from_numpy(group),
        torch.from_numpy(np.log2(finite.height.to_numpy()).astype(np.float32)),
        torch.from_numpy(np.log2(bound).astype(np.float32)),
        excluded_infinite=len(frame) - len(finite),
    )


def place(split: Split, device: torch.device) -> Split:
    """Keep the whole split on the accelerator when it fits (the full-batch path: no DataLoader and no
    host-to-device copy per step); otherwise it stays in host memory and batches are copied as used."""
    if device.type == "cuda":
        needed = sum(t.numel() * t.element_size() for t in (split.x, split.group, split.log2_h, split.log2_bound))
        free, _total = torch.cuda.mem_get_info(device)
        if needed > free // 2:
            return dataclasses.replace(split, x=split.x.pin_memory())
    return dataclasses.replace(split, x=split.x.to(device), group=split.group.to(device),
                               log2_h=split.log2_h.to(device), log2_bound=split.log2_bound.to(device))
