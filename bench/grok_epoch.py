"""Epochs/s of grok_train's epoch (data resident on the device, batches indexed there) vs a DataLoader.

    python bench/grok_epoch.py [--rows 105000 --batch 4096 --width 64 --blocks 5 --device auto]

The baseline is the seed's loop: TensorDataset + DataLoader(shuffle=True) with each batch copied to the
device. Same model, same rows, same batch size, one process; the figure is the ratio.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from labpipe.config import load_params  # noqa: E402
from labpipe.device import resolve_device  # noqa: E402
from labpipe.grok.features import FeatureLayout, Split, place  # noqa: E402
from labpipe.grok.models import build_model, log2_loss  # noqa: E402
from labpipe.grok.train import train_epoch  # noqa: E402


def dataloader_epoch(model, optimizer, split: Split, batch: int, device) -> None:
    dataset = torch.utils.data.TensorDataset(split.x, split.log2_h)
    for x, y in torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True):
        x, y = x.to(device), y.to(device)
        z, aux = model(x)
        loss = log2_loss(z, y).mean()
        optimizer.zero_grad(set_to_none=True)
        (loss + 0.01 * aux).backward()
        optimizer.step()


def epochs_per_second(run_epoch, epochs: int, device) -> float:
    run_epoch()  # warm-up: allocator, kernels
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(epochs):
        run_epoch()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return epochs / (time.perf_counter() - start)


def synthetic_split(rows: int, seed: int = 0) -> tuple[FeatureLayout, Split]:
    """`rows` random training rows of the lab's 21 groups (features, one-hot group, log2 h in [0, 20))."""
    groups = tuple((n, k, m) for n in (9, 10) for k in (4, 5, 6) for m in range(2, n - k + 1))  # the lab's 21
    layout = FeatureLayout(groups, max_k=6, max_r=6, p_scale=100.0)
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(rows, layout.dim, generator=generator)
    group = torch.randint(0, len(groups), (rows,), generator=generator)
    x[:, 36:] = torch.nn.functional.one_hot(group, len(groups)).float()
    split = Split(x, group, torch.rand(rows, generator=generator) * 20, torch.zeros(rows), excluded_infinite=0)
    return layout, split


def measure(rows: int = 105_000, batch: int = 4096, epochs: int = 3, device: str | torch.device = "auto",
            model_name: str = "resnet", width: int = 64, blocks: int = 5, baseline: bool = True) -> dict:
    """Epochs/s of grok_train's epoch on `device` (and of the DataLoader baseline, when `baseline`)."""
    device = resolve_device(str(device))
    root = Path(__file__).resolve().parents[1]
    g = load_params(root / "params.yaml", [f"grok.batch_size={batch}", f"grok.model={model_name}",
                                           f"grok.width={width}", f"grok.blocks={blocks}"]).grok
    layout, split = synthetic_split(rows)
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = build_model(g, layout).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=g.lr, weight_decay=g.weight_decay)
    resident = place(split, device)
    result = {"device": str(device), "rows": rows, "batch": batch, "model": model_name, "width": g.width,
              "blocks": g.blocks, "epochs": epochs,
              "epochs_per_s": epochs_per_second(lambda: train_epoch(model, optimizer, resident, g, generator, device),
                                                epochs, device)}
    if baseline:
        result["dataloader_epochs_per_s"] = epochs_per_second(
            lambda: dataloader_epoch(model, optimizer, split, batch, device), epochs, device)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=105_000, help="training rows (seed: 21 groups x 5000)")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model", default="resnet", choices=["resnet", "moe"])
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=5)
    args = parser.parse_args()

    r = measure(args.rows, args.batch, args.epochs, args.device, args.model, args.width, args.blocks)
    print(f"device {r['device']}, {r['rows']} rows, batch {r['batch']}, {r['model']} width {r['width']} x "
          f"{r['blocks']} blocks")
    print(f"grok_train epoch (device-resident): {r['epochs_per_s']:8.3f} epochs/s")
    print(f"DataLoader baseline:                {r['dataloader_epochs_per_s']:8.3f} epochs/s")
    print(f"ratio: {r['epochs_per_s'] / r['dataloader_epochs_per_s']:.2f}x")


if __name__ == "__main__":
    main()
