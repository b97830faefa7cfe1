"""labpipe hmm-sample: what a saved HMM says, in words (the seed's reasonable.txt, and its sanity checks).

    labpipe hmm-sample                                        # artifacts/hmm/model.pt: 10 sentences, every state
    labpipe hmm-sample --model models:/hmm-K100@champion --sentences 50 --seed 3
    labpipe hmm-sample --prompt "once upon a" --top 5         # and the 5 likeliest next words after the prompt
    labpipe hmm-sample --states 0 --sentences 0               # no samples; the top emissions of the first states

Prints three sections: sampled sequences, detokenized; the top emissions of each hidden state as words with
their probabilities; with --prompt, the next-word distribution after it (its top words). A sequence is drawn
from the HMM with its ends: a start state, then at each step an emission, then the state either ends the
sequence (its end probability) or moves on; one that has not ended after --max-length tokens is cut there and
marked "...". The words are the saved vocabulary (model.pt's, the registered module's, or --vocab FILE, a
vocab.json or tokenizer.json); a prompt is tokenized like the corpus (text.tokenizer.words) and a word outside
the vocabulary is an error naming it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from labpipe.errors import InputError, UserError
from labpipe.hmm.evaluate import MODEL, load_model
from labpipe.hmm.forward_backward import next_token_log_probs
from labpipe.hmm.model import HMM
from labpipe.synth.generate import BlockSampler
from labpipe.text.lab_files import read_tokenizer
from labpipe.text.tokenizer import detokenize, encode

CUT = "..."  # after a sequence that reached --max-length without ending


def sample_sequences(hmm: HMM, count: int, max_length: int, seed: int) -> list[tuple[np.ndarray, bool]]:
    """`count` (sequence, cut) drawn with the HMM's ends; a sequence that has not ended after max_length
    symbols is cut there (cut = True).

    The end is a state of its own, H, absorbing and emitting an extra symbol E: the chain over H + 1 states
    samples with synth's alias tables, and a sequence is its symbols before the first E."""
    h, e = hmm.n_states, hmm.n_symbols
    transition = np.zeros((h + 1, h + 1))
    transition[:h, :h], transition[:h, h], transition[h, h] = hmm.transition.numpy(), hmm.end.numpy(), 1
    emission = np.zeros((h + 1, e + 1))
    emission[:h, :e], emission[h, e] = hmm.emission.numpy(), 1
    first = np.append(hmm.start.numpy(), 0)
    sampler = BlockSampler(first, transition, emission, max_length + 1, count)  # + 1: did it end by max_length?
    _, symbols = sampler.sample(np.random.default_rng(seed))
    rows = symbols.astype(np.int64)
    ended = rows == e
    return [(row[: np.argmax(done)], False) if done.any() else (row[:max_length], True)
            for row, done in zip(rows, ended, strict=True)]


def top_emissions(hmm: HMM, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, top) probabilities and symbols of each state's likeliest emissions, likeliest first."""
    return hmm.emission.topk(min(top, hmm.n_symbols), dim=1)


def next_word_probs(hmm: HMM, prompt: list[int]) -> torch.Tensor:
    """(E,) p(next symbol | the prompt, a symbol follows): the forward algorithm over the prompt."""
    tokens = torch.tensor([prompt + [0]])  # the appended symbol is only the slot whose prediction is read
    return next_token_log_probs(hmm, tokens, torch.tensor([len(prompt) + 1]))[0, -1].exp()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="labpipe hmm-sample", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:7]))
    parser.add_argument("--model", default=str(MODEL),
                        help=f"a model.pt, a checkpoint or an MLflow URI (default {MODEL})")
    parser.add_argument("--vocab", help="the words by id: a vocab.json or tokenizer.json (default: the model's)")
    parser.add_argument("--sentences", type=int, default=10, help="sequences to sample (default 10)")
    parser.add_argument("--max-length", type=int, default=100, help="cut a sequence longer than this (default 100)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--states", type=int, help="show the top emissions of this many states (default all)")
    parser.add_argument("--top", type=int, default=10, help="words per state and after the prompt (default 10)")
    parser.add_argument("--prompt", help="text whose next word the HMM predicts")
    args = parser.parse_args(argv)
    try:
        for flag, value, low in (("--sentences", args.sentences, 0), ("--max-length", args.max_length, 1),
                                 ("--seed", args.seed, 0), ("--top", args.top, 1), ("--states", args.states, 0)):
            if value is not None and value < low:
                raise InputError(f"{flag} must be at least {low}, got {value}")
        hmm, vocab = load_model(args.model)
        if args.vocab:
            vocab = read_tokenizer(Path(args.vocab))
        if vocab is None or len(vocab) < hmm.n_symbols:
            raise InputError(f"{args.vocab or args.model}: no vocabulary for the HMM's {hmm.n_symbols} symbols: "
                             "give --vocab artifacts/text/tokens/train/K<K>/vocab.json")
        report(hmm, vocab, args)
    except UserError as error:
        print(f"labpipe hmm-sample: error: {error}", file=sys.stderr)
        return error.exit_code
    return 0


def report(hmm: HMM, vocab: list[str], args: argparse.Namespace) -> None:
    print(f"# {args.model}: H={hmm.n_states} states, K={hmm.n_symbols} symbols")
    if args.sentences:
        print(f"\n## {args.sentences} samples (seed {args.seed})")
        for sequence, cut in sample_sequences(hmm, args.sentences, args.max_length, args.seed):
            print(detokenize([vocab[i] for i in sequence]) + (f" {CUT}" if cut else ""))
    states = hmm.n_states if args.states is None else min(args.states, hmm.n_states)
    if states:
        print(f"\n## top emissions of {states} of {hmm.n_states} states")
        probs, symbols = top_emissions(hmm, args.top)
        for state in range(states):
            shown = ", ".join(f"{vocab[s]} {p:.3f}" for p, s in zip(probs[state].tolist(), symbols[state].tolist(),
                                                                    strict=True))
            print(f"state {state} (start {hmm.start[state]:.3f}, end {hmm.end[state]:.3f}): {shown}")
    if args.prompt is not None:
        probs = next_word_probs(hmm, encode(args.prompt, vocab, args.vocab or args.model))
        best = probs.topk(min(args.top, hmm.n_symbols))
        print(f"\n## next word after {args.prompt!r}")
        print(", ".join(f"{vocab[s]} {p:.3f}" for p, s in zip(best.values.tolist(), best.indices.tolist(),
                                                             strict=True)))
