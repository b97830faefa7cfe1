"""Word-level text corpora for the HMM line: stories in, top-K token files out."""

from labpipe.text.corpus import generate_stories, load_stories
from labpipe.text.token_file import distinct, iter_token_file, read_token_file, split_singletons, write_token_file
from labpipe.text.tokenizer import build_vocab, detokenize, sentences, tokenize_corpus, words

__all__ = [
    "build_vocab",
    "detokenize",
    "distinct",
    "generate_stories",
    "iter_token_file",
    "load_stories",
    "read_token_file",
    "sentences",
    "split_singletons",
    "tokenize_corpus",
    "words",
    "write_token_file",
]
