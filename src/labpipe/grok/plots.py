"""The plots people look at: loss curves with spike and grokking markers, and the norms that explain them."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: stages run headless
import matplotlib.pyplot as plt  # noqa: E402


def _mark(ax, spikes: list[int], grokking_epoch: int | None, legend: bool) -> None:
    for i, epoch in enumerate(spikes):
        label = "train-loss spike" if legend and i == 0 else None
        ax.axvline(epoch, color="red", alpha=0.3, linestyle="--", label=label)
    if grokking_epoch is not None:
        ax.axvline(grokking_epoch, color="green", linewidth=2, alpha=0.7,
                   label=f"grokking epoch {grokking_epoch}" if legend else None)


def plot_history(train_history: list[dict], val_history: list[dict], spikes: list[int], grokking_epoch: int | None,
                 out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    epochs = [r["epoch"] for r in train_history]

    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(epochs, [r["train_loss"] for r in train_history], label="train")
    ax.plot([r["epoch"] for r in val_history], [r["val_loss"] for r in val_history], "o-", label="val")
    _mark(ax, spikes, grokking_epoch, legend=True)
    ax.set(xlabel="epoch", ylabel="(log2 h - log2 h_hat)^2", yscale="log", title="m-height regressor")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "loss.png", dpi=120)
    plt.close(fig)

    layers = [key for key in train_history[0] if key.startswith("weight_norm/")]
    fig, axes = plt.subplots(4, 1, figsize=(8, 10.5), sharex=True)
    for ax, key, label in zip(axes, ("weight_norm", "grad_norm", "update_ratio"),
                              ("total weight norm", "gradient norm (mean per epoch)", "update ratio |dθ|/|θ|"),
                              strict=False):
        ax.plot(epochs, [r[key] for r in train_history])
        ax.set_ylabel(label)
        _mark(ax, spikes, grokking_epoch, legend=False)
    for key in layers:
        axes[3].plot(epochs, [r[key] for r in train_history], label=key.removeprefix("weight_norm/"), linewidth=1)
    axes[3].set_ylabel("weight norm per layer")
    if len(layers) <= 12:
        axes[3].legend(fontsize=6, ncol=2)
    _mark(axes[3], spikes, grokking_epoch, legend=False)
    axes[1].set_yscale("log")
    axes[2].set_yscale("log")
    axes[-1].set_xlabel("epoch")
    fig.tight_layout()
    fig.savefig(out_dir / "norms.png", dpi=120)
    plt.close(fig)
