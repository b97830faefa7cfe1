"""Synthetic token datasets sampled from HMMs: sharded raw memmaps and their JSON manifest."""
