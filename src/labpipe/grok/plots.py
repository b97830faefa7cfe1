"""The plots people look at: loss curves with spike markers, and the norms that explain them."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: stages run headless
import matplotlib.pyplot as plt  # noqa: E402


def plot_history(train_history: list[dict], val_history: list[dict], spikes: list[int], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    epochs = [r["epoch"] for r in train_history]

    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(epochs, [r["train_loss"] for r in train_history], label="train")
    ax.plot([r["epoch"] for r in val_history], [r["val_loss"] for r in val_history], "o-", label="val")
    for i, epoch in enumerate(spikes):
        ax.axvline(epoch, color="red", alpha=0.3, linestyle="--", label="train-loss spike" if i == 0 else None)
    ax.set(xlabel="epoch", ylabel="(log2 h - log2 h_hat)^2", yscale="log", title="m-height regressor")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "loss.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
    for ax, key, label in zip(axes, ("weight_norm", "grad_norm", "update_ratio"),
                              ("total weight norm", "gradient norm (mean per epoch)", "update ratio |dθ|/|θ|"),
                              strict=True):
        ax.plot(epochs, [r[key] for r in train_history])
        ax.set_ylabel(label)
        for epoch in spikes:
            ax.axvline(epoch, color="red", alpha=0.3, linestyle="--")
    axes[1].set_yscale("log")
    axes[2].set_yscale("log")
    axes[-1].set_xlabel("epoch")
    fig.tight_layout()
    fig.savefig(out_dir / "norms.png", dpi=120)
    plt.close(fig)
