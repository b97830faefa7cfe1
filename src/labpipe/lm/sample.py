"""labpipe lm-sample: sequences sampled from a saved LM, shown as the HMM's words when the ids are its words.

    labpipe lm-sample                                            # artifacts/lm/model, 5 sequences of 32 tokens
    labpipe lm-sample --model artifacts/lm/checkpoints/step_00000400 --prompt "once upon a" --length 64
    labpipe lm-sample --model models:/lm-synthetic@champion --prompt-ids 3,17 --temperature 0.7 --ids

Each token is drawn from softmax(logits / temperature) given the tokens before it. The LM never learnt to
predict a first token (the synthetic rows have no BOS), so without a prompt x_0 is drawn from the generating
HMM's law of first symbols (the manifest's HMM and start), or uniformly when the emissions were permuted (the
exact marginal then) or no manifest is there. Tokens are shown as words when a vocabulary applies: --vocab
FILE (a vocab.json or tokenizer.json), else the vocabulary saved with the manifest's HMM unless the data
permuted its emissions (an id then means another word in every block); otherwise as ids.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from labpipe.device import resolve_device
from labpipe.errors import InputError, UserError
from labpipe.hmm.evaluate import load_model as load_hmm
from labpipe.inputs import from_pretrained, is_model_uri
from labpipe.lm.evaluate import generating_hmm
from labpipe.lm.train import MODEL_DIR
from labpipe.synth.manifest import MANIFEST, Manifest, load_manifest
from labpipe.text.lab_files import read_tokenizer
from labpipe.text.tokenizer import detokenize, encode


def load_lm(source: str) -> torch.nn.Module:
    """A causal LM: a save_pretrained directory (lm_train's model or a step_* checkpoint) or an MLflow URI."""
    if is_model_uri(source):
        from labpipe.tracking import load_logged_model

        return load_logged_model(source)
    from transformers import AutoModelForCausalLM

    if not (Path(source) / "config.json").is_file():
        raise InputError(f"{source}: not a save_pretrained directory (no config.json): run lm_train, or give "
                         "--model artifacts/lm/checkpoints/step_...")
    return from_pretrained(AutoModelForCausalLM, source, "causal LM")


@torch.no_grad()
def sample(model: torch.nn.Module, prompts: torch.Tensor, length: int, temperature: float,
           generator: torch.Generator) -> torch.Tensor:
    """(N, length) sequences that begin with the (N, P) prompts, each further token drawn from the model's
    softmax(logits / temperature) given the ones before it (drawn on the CPU: the same seed, the same tokens).
    The whole prefix is run at every step, without a KV cache: a tool's few sequences, and no dependence on
    the cache API of the installed transformers."""
    model.eval()
    device = next(model.parameters()).device
    tokens = prompts
    while tokens.shape[1] < length:
        logits = model(input_ids=tokens.to(device), use_cache=False).logits[:, -1]
        probs = F.softmax(logits.float().cpu() / temperature, dim=-1)
        tokens = torch.cat([tokens, torch.multinomial(probs, 1, generator=generator)], dim=1)
    return tokens


def first_symbol_law(manifest: Manifest | None, vocab_size: int) -> torch.Tensor:
    """The law of x_0 (see the module docstring)."""
    if manifest is None or manifest.permute_emissions:
        return torch.full((vocab_size,), 1 / vocab_size)
    hmm = generating_hmm(manifest)
    law = torch.zeros(vocab_size, dtype=torch.float64)
    law[: hmm.n_symbols] = hmm.start @ hmm.emission
    return law


def vocabulary(path: str | None, manifest: Manifest | None) -> tuple[list[str] | None, str]:
    """The words by id, or None, and where they come from (or why there are none)."""
    if path:
        return read_tokenizer(Path(path)), path
    if manifest is None:
        return None, f"no {MANIFEST} and no --vocab"
    if manifest.permute_emissions:
        return None, f"{manifest.path}: the emissions are permuted per block, so an id is no fixed word"
    _, vocab = load_hmm(manifest.hmm["path"])
    return (vocab, manifest.hmm["path"]) if vocab else (None, f"{manifest.hmm['path']} holds no vocabulary")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="labpipe lm-sample", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:5]))
    parser.add_argument("--model", default=str(MODEL_DIR),
                        help=f"a save_pretrained directory or an MLflow URI (default {MODEL_DIR})")
    parser.add_argument("--sequences", type=int, default=5)
    parser.add_argument("--length", type=int, default=32, help="tokens per sequence, the prompt's included")
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="words the sequences start with (needs a vocabulary)")
    prompt.add_argument("--prompt-ids", help="comma-separated ids the sequences start with")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab", help="the words by id: a vocab.json or tokenizer.json")
    parser.add_argument("--manifest", default=str(MANIFEST), help=f"the synthetic data's manifest (default {MANIFEST})")
    parser.add_argument("--ids", action="store_true", help="show ids, even where a vocabulary applies")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    try:
        run(args)
    except UserError as error:
        print(f"labpipe lm-sample: error: {error}", file=sys.stderr)
        return error.exit_code
    return 0


def run(args: argparse.Namespace) -> None:
    if args.sequences < 1 or args.length < 1 or args.seed < 0 or not args.temperature > 0:
        raise InputError("--sequences and --length must be at least 1, --seed at least 0, --temperature above 0")
    manifest = load_manifest(args.manifest) if Path(args.manifest).exists() else None
    vocab, why = vocabulary(args.vocab, manifest)
    generator = torch.Generator().manual_seed(args.seed)
    if args.prompt is not None:
        if vocab is None:
            raise InputError(f"--prompt needs a vocabulary ({why}): give --vocab, or --prompt-ids")
        prompt = encode(args.prompt, vocab, why)
    elif args.prompt_ids is not None:
        try:
            prompt = [int(item) for item in args.prompt_ids.split(",") if item.strip()]
        except ValueError:
            raise InputError(f"--prompt-ids {args.prompt_ids!r}: expected comma-separated integers") from None
    else:
        prompt = []
    model = load_lm(args.model).to(resolve_device(args.device, "--device"))
    vocab_size = model.config.vocab_size
    if any(not 0 <= i < vocab_size for i in prompt):
        raise InputError(f"the prompt's ids must lie in [0, {vocab_size}), the model's vocabulary")
    if len(prompt) > args.length:
        raise InputError(f"the prompt has {len(prompt)} tokens, more than --length={args.length}")
    if prompt:
        prompts = torch.tensor([prompt] * args.sequences)
    else:
        prompts = torch.multinomial(first_symbol_law(manifest, vocab_size), args.sequences, replacement=True,
                                    generator=generator)[:, None]
    sequences = sample(model, prompts, args.length, args.temperature, generator)

    if vocab is not None and int(sequences.max()) >= len(vocab):
        vocab, why = None, f"an id above the {len(vocab)} words of {why}"
    shown = vocab is not None and not args.ids
    print(f"# {args.model}: {args.sequences} sequences of {args.length} tokens, temperature {args.temperature}, "
          f"seed {args.seed}; " + (f"words of {why}" if shown else f"ids ({'--ids' if args.ids else why})"))
    for row in sequences.tolist():
        print(detokenize([vocab[i] for i in row]) if shown else " ".join(map(str, row)))
