"""Tokens/s of the dormancy analysis (hooks + running statistics) vs a plain forward pass of the same model.

    python bench/dormancy.py [--quick] [--arch llama|gpt_neox|both]

Same random-weight model (built from a config: Pythia-70m-like widths by default), same batches with
padding, in one process; the analysis should cost < 20 % over the forward pass. Best of several repeats.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from labpipe.dormancy.analysis import layer_statistics  # noqa: E402


def build(arch: str, hidden: int, layers: int, vocab: int) -> torch.nn.Module:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

    common = {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": 8,
              "intermediate_size": 4 * hidden, "vocab_size": vocab, "max_position_embeddings": 2048}
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(**common)) if arch == "gpt_neox" else LlamaForCausalLM(
        LlamaConfig(**common))
    return model.eval()


def batches(n: int, batch: int, length: int, vocab: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch, length), generator=generator)
        mask = torch.ones_like(ids)
        mask[: batch // 2, length * 3 // 4:] = 0  # half the rows padded: the mask is part of the work
        out.append((ids, mask))
    return out


@torch.no_grad()
def plain(model, data) -> None:
    for ids, mask in data:
        model(input_ids=ids, attention_mask=mask)


def best_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--arch", default="both", choices=["llama", "gpt_neox", "both"])
    args = parser.parse_args()
    hidden, layers, n, batch, length, repeats = (128, 2, 4, 4, 64, 3) if args.quick else (512, 6, 8, 8, 128, 5)
    vocab = 50304
    device = torch.device("cpu")
    for arch in (["llama", "gpt_neox"] if args.arch == "both" else [args.arch]):
        model = build(arch, hidden, layers, vocab)
        data = batches(n, batch, length, vocab)
        tokens = sum(int(mask.sum()) for _, mask in data)
        plain(model, data[:1])  # warm-up
        forward = best_seconds(lambda model=model, data=data: plain(model, data), repeats)
        analysis = best_seconds(lambda model=model, data=data: layer_statistics(model, data, device), repeats)
        print(f"{arch} (hidden {hidden}, {layers} layers, {n} batches of {batch} x {length}, CPU)")
        print(f"  plain forward     {tokens / forward:12,.0f} tokens/s")
        overhead = 100 * (analysis / forward - 1)
        print(f"  dormancy analysis {tokens / analysis:12,.0f} tokens/s   overhead {overhead:+.1f}% (goal < 20%)")


if __name__ == "__main__":
    main()
