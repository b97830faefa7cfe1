"""Tokens/s of the dormancy analysis (hooks + running statistics) vs a plain forward pass of the same model.

    python bench/dormancy.py [--quick] [--arch llama|gpt_neox|both]

Same random-weight model (built from a config: Pythia-70m's widths by default, vocabulary 50304), same
batches with padding, in one process. Three timings: the causal LM's plain forward (what a script computing
dormancy from model(...) pays), the plain forward of its backbone (no LM head: what the analysis runs), and the
analysis itself. The hooks and statistics should cost < 20 % over the backbone's forward. The three are timed
in turn, repeat after repeat, and each keeps its best: a neighbour's load on a shared machine hits all three.
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


@torch.inference_mode()
def plain(model, data) -> None:
    for ids, mask in data:
        model(input_ids=ids, attention_mask=mask, use_cache=False)


def best_seconds(functions: dict, repeats: int) -> dict[str, float]:
    best = dict.fromkeys(functions, float("inf"))
    for _ in range(repeats):
        for name, fn in functions.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--arch", default="both", choices=["llama", "gpt_neox", "both"])
    args = parser.parse_args()
    hidden, layers, n, batch, length, repeats = (128, 2, 4, 4, 64, 5) if args.quick else (512, 6, 8, 8, 128, 5)
    vocab = 50304
    device = torch.device("cpu")
    for arch in (["llama", "gpt_neox"] if args.arch == "both" else [args.arch]):
        model = build(arch, hidden, layers, vocab)
        data = batches(n, batch, length, vocab)
        tokens = sum(int(mask.sum()) for _, mask in data)
        plain(model, data[:1])  # warm-up
        seconds = best_seconds({"causal LM": lambda model=model, data=data: plain(model, data),
                                "backbone": lambda model=model, data=data: plain(model.base_model, data),
                                "analysis": lambda model=model, data=data: layer_statistics(model, data, device)},
                               repeats)
        print(f"{arch} (hidden {hidden}, {layers} layers, vocabulary {vocab}, {n} batches of {batch} x {length}, CPU)")
        print(f"  plain forward, causal LM  {tokens / seconds['causal LM']:10,.0f} tokens/s")
        print(f"  plain forward, backbone   {tokens / seconds['backbone']:10,.0f} tokens/s")
        overhead = 100 * (seconds["analysis"] / seconds["backbone"] - 1)
        speedup = seconds["causal LM"] / seconds["analysis"]
        print(f"  dormancy analysis         {tokens / seconds['analysis']:10,.0f} tokens/s   "
              f"hooks + statistics {overhead:+.1f}% over the backbone (goal < 20%), {speedup:.2f}x the causal LM")


if __name__ == "__main__":
    main()
