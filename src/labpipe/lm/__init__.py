"""Llama (Hugging Face) language models trained on the synthetic HMM shards, and their in-context learning curve.

data.py      the shards of a split as a Dataset read row by row from memmaps, and the seeded epoch order
train.py     stage lm_train: checks, model and training loop; run lifecycle and step_XXXXXXXX checkpoints: labpipe.run
evaluate.py  stage lm_eval: per-position cross-entropy of the LM vs the generating HMM's Bayes loss and n-grams
"""
