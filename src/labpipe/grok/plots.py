"""The plots people look at: loss curves with spike and grokking markers, and the norms that explain them."""

from __future__ import annotations

from pathlib import Path

from labpipe.plotting import pyplot, save_figure


def _mark(ax, spikes: list[int], grokking_epoch: int | None, legend: bool) -> None:
    for i, epoch in enumerate(spikes):
        label = "train-loss spike" if legend and i == 0 else None
        ax.axvline(epoch, color="red", alpha=0.3, linestyle="--", label=label)
    if grokking_epoch is not None:
        ax.axvline(grokking_epoch, color="green", linewidth=2, alpha=0.7,
                   label=f"grokking epoch {grokking_epoch}" if legend else None)


def plot_history(train_history: list[dict], val_history: list[dict], spikes: list[int], grokking_epoch: int | None,
                 out_dir: Path, title: str) -> None:
    """loss.png and norms.png in out_dir; `title` names the run (its model and weight decay)."""
    plt = pyplot()
    epochs = [r["epoch"] for r in train_history]

    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(epochs, [r["train_loss"] for r in train_history], label="train")
    ax.plot([r["epoch"] for r in val_history], [r["val_loss"] for r in val_history], "o-", label="val")
    _mark(ax, spikes, grokking_epoch, legend=True)
    ax.set(xlabel="epoch", ylabel="(log2 h - log2 h_hat)^2 (bits^2)", yscale="log", title=f"Loss, {title}")
    ax.legend()
    save_figure(fig, out_dir / "loss.png")

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
    axes[3].legend(fontsize=6, ncol=max(2, -(-len(layers) // 8)))  # at most 8 rows: 17 layers in 3 columns
    _mark(axes[3], spikes, grokking_epoch, legend=False)
    axes[1].set_yscale("log")
    axes[2].set_yscale("log")
    axes[-1].set_xlabel("epoch")
    fig.suptitle(f"Norms, {title}")
    save_figure(fig, out_dir / "norms.png")
