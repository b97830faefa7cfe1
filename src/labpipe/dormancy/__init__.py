"""Dormant neurons of a language model across its training checkpoints: CSV and plots."""
