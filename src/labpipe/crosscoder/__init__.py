"""Sparse crosscoders between two sources (two checkpoints or two layers): stage activations harvests both
residual streams into an on-disk buffer (buffer.py), stage crosscoder_train fits the model (model.py, train.py)
and logs the seed's metrics (metrics.py)."""

from labpipe.crosscoder.buffer import ActivationBuffer, BatchStream, ShuffledBatches, write_buffer
from labpipe.crosscoder.metrics import DeadLatents, Totals, span_metrics, span_sums
from labpipe.crosscoder.model import Crosscoder, load_crosscoder

__all__ = ["ActivationBuffer", "BatchStream", "Crosscoder", "DeadLatents", "ShuffledBatches", "Totals",
           "load_crosscoder", "span_metrics", "span_sums", "write_buffer"]
