"""Stage activations: both sources' residual streams on the same tokens, harvested once into an on-disk buffer,
and the loader that feeds crosscoder_train from it.

The buffer is a directory (crosscoder.buffer_dir):

    activations.bin  raw C-order array (N, d_a + d_b), no header; row r = [a_r | b_r], the activations of source
                     a and source b on the same token. float16, or bfloat16 stored as its uint16 bit patterns
                     (numpy has no bfloat16; torch views them back).
    meta.json        {"format", "rows": N, "d_a", "d_b", "dtype", "scales": [s_a, s_b], "mean_norms", "sha256"
                     (of activations.bin), "inputs": {the sources, layers, token source and their sha256s}}

Both are written in a temp directory that is renamed into place (files.atomic_dir): a buffer directory that
exists is complete, and a killed harvest leaves the previous buffer (or none), never half of one.

Convention: the residual stream after decoder layer L is hidden_states[L + 1] of a forward pass with
output_hidden_states=True (hidden_states[0] is the embedding output). transformers ties the last entry to the
output of the final norm; the harvest turns that off (config.tie_last_hidden_states = False, transformers >= 5),
so that for the last layer too it is the residual stream, not its normalized version.

Normalization: activations are stored as the models give them, and s_s = sqrt(d_s) / mean_r ||a_r^s|| is
computed over all N stored rows (after rounding to 16 bits), so that the rows the loader returns, s_s * a^s,
have mean norm exactly sqrt(d_s) per source: the same loss weight and the same l1_coef suit any model width.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
import queue
import shutil
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from labpipe.config import CrosscoderParams, Params
from labpipe.device import resolve_device
from labpipe.errors import InputError
from labpipe.files import atomic_dir, require_free, sha256_file, write_json
from labpipe.inputs import from_pretrained, read_json

FORMAT = 1
DATA, META = "activations.bin", "meta.json"
STORAGE = {"float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2")}  # bfloat16: bit patterns
HARVEST_TOKENS = 16384  # tokens per forward pass of the harvest
PREFETCH = 2  # batches read ahead: by the background thread, and by each DataLoader worker


# ----------------------------------------------------------------------------- writing


def write_buffer(directory: str | Path, chunks: Iterable[tuple[torch.Tensor, torch.Tensor]], rows: int, d_a: int,
                 d_b: int, dtype: str, inputs: dict) -> dict:
    """Write `rows` rows, given as chunks (a (n, d_a), b (n, d_b)) of floats, as the buffer in `directory`;
    returns its metadata. The norms for the scales and the sha256 are taken as the rows stream by."""
    torch_dtype = getattr(torch, dtype)
    storage = STORAGE[dtype]
    with atomic_dir(directory) as tmp:
        data = np.memmap(tmp / DATA, dtype=storage, mode="w+", shape=(rows, d_a + d_b))
        digest = hashlib.sha256()
        norm_sums = np.zeros(2)
        filled = 0
        for a, b in chunks:
            block = torch.cat([a, b], dim=1).to(device="cpu", dtype=torch_dtype)
            if not torch.isfinite(block).all():
                raise InputError(f"activations are not finite in {dtype} (rows {filled}..{filled + len(block) - 1})"
                                 + (": they overflow float16, use buffer_dtype=bfloat16" if dtype == "float16" else ""))
            if filled + len(block) > rows:
                raise InputError(f"more than the {rows} rows announced")
            stored = block.float()
            norm_sums += [float(stored[:, :d_a].norm(dim=1).double().sum()),
                          float(stored[:, d_a:].norm(dim=1).double().sum())]
            raw = block.view(torch.int16).numpy().view(storage)
            data[filled : filled + len(raw)] = raw
            digest.update(raw.tobytes())
            filled += len(raw)
        if filled != rows:
            raise InputError(f"the activations ended after {filled} of {rows} rows")
        data.flush()
        del data
        mean_norms = norm_sums / rows
        meta = {"format": FORMAT, "rows": rows, "d_a": d_a, "d_b": d_b, "dtype": dtype,
                "mean_norms": mean_norms.tolist(),
                "scales": [math.sqrt(d) / norm for d, norm in zip((d_a, d_b), mean_norms, strict=True)],
                "sha256": digest.hexdigest(), "inputs": inputs}
        write_json(tmp / META, meta)
    return meta


# ----------------------------------------------------------------------------- harvesting (stage activations)


def content_sha256(name: str) -> str | None:
    """sha256 of a local file, or of a directory's files (names and contents); None for a hub name."""
    path = Path(name)
    if path.is_file():
        return sha256_file(path)
    if path.is_dir():
        digest = hashlib.sha256()
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(f"{file.relative_to(path)}\0{sha256_file(file)}\0".encode())
        return digest.hexdigest()
    return None


def load_source(name: str, device: torch.device) -> torch.nn.Module:
    """A causal LM (a local save_pretrained directory or a hub name) in float32, in eval mode, on `device`."""
    from transformers import AutoModelForCausalLM

    model = from_pretrained(AutoModelForCausalLM, name, "causal LM").float().to(device).eval()
    model.config.tie_last_hidden_states = False  # hidden_states[-1]: the residual stream, not the final norm's output
    return model


def residual_stream(model: torch.nn.Module, ids: torch.Tensor, layer: int) -> torch.Tensor:
    """(batch, length, d): the residual stream after decoder layer `layer`, hidden_states[layer + 1]."""
    # base_model: the decoder stack without the LM head, whose logits the harvest does not need
    return model.base_model(input_ids=ids, output_hidden_states=True).hidden_states[layer + 1]


def synth_tokens(configs: Sequence) -> tuple[Iterator[np.ndarray], int, dict]:
    """The synthetic train shards' sequences in manifest order, their length, and the record of where they are."""
    from labpipe.synth.manifest import load_manifest

    manifest = load_manifest()
    for config in configs:
        if manifest.vocab_size > config.vocab_size:
            raise InputError(f"the synthetic data has {manifest.vocab_size} symbols, a source has a vocabulary of "
                             f"{config.vocab_size}")
    shards = manifest.split("train")
    sequences = itertools.chain.from_iterable(manifest.open(shard) for shard in shards)
    record = {"text_source": "synth", "manifest": str(manifest.path), "sha256": sha256_file(manifest.path)}
    return sequences, manifest.seq_length, record


def text_tokens(c: CrosscoderParams, context: int) -> tuple[Iterator[np.ndarray], int, dict]:
    """A text source (load_stories: a dataset name or local path; its split crosscoder.text_split, field
    text_field) tokenized by source a's tokenizer, which must be source b's too, as one stream (eos between
    stories) cut into sequences of `context` tokens (text_context, or less for the models' context)."""
    from transformers import AutoTokenizer

    from labpipe.text.corpus import load_stories

    tokenizer = AutoTokenizer.from_pretrained(c.source_a)
    if AutoTokenizer.from_pretrained(c.source_b).get_vocab() != tokenizer.get_vocab():
        raise InputError("text_source needs one tokenizer: source_a and source_b tokenize differently")

    def sequences() -> Iterator[np.ndarray]:
        pending: list[int] = []
        for story in load_stories(c.text_source, c.text_split, text_field=c.text_field):
            pending += tokenizer(story)["input_ids"]
            if tokenizer.eos_token_id is not None:
                pending.append(tokenizer.eos_token_id)
            while len(pending) >= context:
                yield np.array(pending[:context])
                del pending[:context]

    record = {"text_source": c.text_source, "sha256": content_sha256(c.text_source), "tokenizer": c.source_a,
              "split": c.text_split, "field": c.text_field, "context": c.text_context}
    return sequences(), context, record


@torch.inference_mode()
def harvest(models: Sequence[torch.nn.Module], layers: Sequence[int], sequences: Iterator[np.ndarray],
            seq_length: int, tokens: int, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(a, b) chunks of the residual streams, token after token of the sequences, `tokens` rows in all."""
    per_forward = max(1, HARVEST_TOKENS // seq_length)
    done = 0
    with tqdm(total=tokens, desc="activations", unit="tok", unit_scale=True) as bar:
        while done < tokens:
            batch = list(itertools.islice(sequences, per_forward))
            if not batch:
                raise InputError(f"the token source ran out after {done} tokens; buffer_tokens={tokens}")
            ids = torch.from_numpy(np.stack(batch).astype(np.int64)).to(device)
            a, b = (residual_stream(model, ids, layer).flatten(0, 1)[: tokens - done]
                    for model, layer in zip(models, layers, strict=True))
            yield a, b
            done += len(a)
            bar.update(len(a))


META_KEYS = ("format", "rows", "d_a", "d_b", "dtype", "scales", "sha256", "inputs")


def read_meta(directory: str | Path) -> dict | None:
    path = Path(directory) / META
    return read_json(path, "activation buffer meta.json", META_KEYS) if path.exists() else None


def run_activations(params: Params) -> None:
    """Stage activations."""
    from transformers import AutoConfig

    from labpipe.tracking import stage_run

    c = params.crosscoder
    device = resolve_device(c.device, "crosscoder.device")
    directory = Path(c.buffer_dir)
    names, layers = (c.source_a, c.source_b), (c.layer_a, c.layer_b)
    try:
        configs = [AutoConfig.from_pretrained(name) for name in names]
    except OSError as error:
        raise InputError(f"a source is neither a local save_pretrained directory nor a reachable hub model "
                         f"(run lm_train first?): {error}") from error
    for name, config, layer in zip(names, configs, layers, strict=True):
        if not 0 <= layer < config.num_hidden_layers:
            raise InputError(f"{name} has {config.num_hidden_layers} layers: layer {layer} does not exist")
    if c.text_source == "synth":
        sequences, seq_length, tokens = synth_tokens(configs)
    else:
        context = min(c.text_context, *(config.max_position_embeddings for config in configs))
        sequences, seq_length, tokens = text_tokens(c, context)
    for name, config in zip(names, configs, strict=True):
        if seq_length > config.max_position_embeddings:
            raise InputError(f"sequences of {seq_length} tokens do not fit {name}'s context of "
                             f"{config.max_position_embeddings}")
    inputs = {"source_a": {"name": c.source_a, "layer": c.layer_a, "sha256": content_sha256(c.source_a)},
              "source_b": {"name": c.source_b, "layer": c.layer_b, "sha256": content_sha256(c.source_b)},
              "tokens": tokens, "seq_length": seq_length, "buffer_tokens": c.buffer_tokens,
              "dtype": c.buffer_dtype, "convention": "residual stream after layer L = hidden_states[L + 1]"}
    existing = read_meta(directory)
    if existing is not None and existing["inputs"] == inputs:
        print(f"{directory}: up to date ({existing['rows']} rows from the same sources and tokens)")
        return
    for stale in directory.parent.glob(f".{directory.name}.*.tmp"):  # left by a killed harvest
        shutil.rmtree(stale, ignore_errors=True)

    keys = ("source_a", "source_b", "layer_a", "layer_b", "text_source", "buffer_tokens", "buffer_dtype", "buffer_dir")
    logged = {f"crosscoder.{key}": getattr(c, key) for key in keys}
    d_a, d_b = (config.hidden_size for config in configs)
    require_free(directory.parent, c.buffer_tokens * (d_a + d_b) * STORAGE[c.buffer_dtype].itemsize,
                 "crosscoder.buffer_dir")
    with stage_run(params.tracking, "activations", logged) as run:
        models = [load_source(name, device) for name in names]
        started = time.perf_counter()
        chunks = harvest(models, layers, sequences, seq_length, c.buffer_tokens, device)
        meta = write_buffer(directory, chunks, c.buffer_tokens, d_a, d_b, c.buffer_dtype, inputs)
        seconds = time.perf_counter() - started
        run.log_metrics({"rows": meta["rows"], "d_a": d_a, "d_b": d_b, "scale_a": meta["scales"][0],
                         "scale_b": meta["scales"][1], "mean_norm_a": meta["mean_norms"][0],
                         "mean_norm_b": meta["mean_norms"][1], "rows_per_s": meta["rows"] / seconds}, step=0)
        run.log_outputs([directory])
    print(f"{directory}: {meta['rows']} rows, d_a={d_a}, d_b={d_b}, {c.buffer_dtype}, mean norms "
          f"{meta['mean_norms'][0]:.4g} / {meta['mean_norms'][1]:.4g}, {meta['rows'] / seconds:.0f} rows/s")


# ----------------------------------------------------------------------------- reading


@dataclasses.dataclass(frozen=True)
class ActivationBuffer:
    directory: Path
    rows: int
    d_a: int
    d_b: int
    dtype: str
    scales: tuple[float, float]
    meta: dict

    @classmethod
    def open(cls, directory: str | Path) -> ActivationBuffer:
        directory = Path(directory)
        meta = read_meta(directory)
        if meta is None:
            raise InputError(f"no activation buffer at {directory}: run the activations stage first")
        if meta.get("format") != FORMAT:
            raise InputError(f"{directory}: buffer format {meta.get('format')!r}, this labpipe reads {FORMAT}")
        buffer = cls(directory, meta["rows"], meta["d_a"], meta["d_b"], meta["dtype"], tuple(meta["scales"]), meta)
        expected = buffer.rows * buffer.width * STORAGE[buffer.dtype].itemsize
        if (directory / DATA).stat().st_size != expected:
            raise InputError(f"{directory / DATA} has {(directory / DATA).stat().st_size} bytes, {META} says "
                             f"{expected}")
        if sha256_file(directory / DATA) != meta["sha256"]:  # ~1 GB/s: seconds against a run of hours
            raise InputError(f"{directory / DATA}: its sha256 is not the one {META} recorded at harvest: the rows "
                             "changed since (rerun the activations stage)")
        return buffer

    @property
    def width(self) -> int:
        return self.d_a + self.d_b

    def array(self) -> np.memmap:
        """The rows, read-only and unscaled: a mapping of the file, whose pages every process shares."""
        return np.memmap(self.directory / DATA, dtype=STORAGE[self.dtype], mode="r", shape=(self.rows, self.width))

    def scale_vector(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """(d_a + d_b,): s_a on source a's columns, s_b on source b's."""
        return torch.tensor([self.scales[0]] * self.d_a + [self.scales[1]] * self.d_b, device=device)

    def to_float(self, raw: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Stored rows (their 16 bits as int16) -> normalized float32 rows, on raw's device (and scale's).

        On the CPU in numpy, which uses one thread: torch would start an OpenMP team in the loader thread beside
        the training step's, and on 2 cores that cost 6% of the training steps/s (numpy: 1%). Both give the
        same floats: the 16-bit values widen exactly, and the product is one float32 rounding either way.
        """
        if raw.device.type != "cpu":
            return raw.view(getattr(torch, self.dtype)).float() * scale
        bits = raw.numpy().view(np.uint16)
        if self.dtype == "float16":
            values = bits.view(np.float16).astype(np.float32)
        else:  # a bfloat16 is the high half of the float32 with the same value
            values = (bits.astype(np.uint32) << 16).view(np.float32)
        return torch.from_numpy(values * scale.numpy())


class ShuffledBatches(torch.utils.data.Dataset):
    """Item g is the g-th training batch: batch b = g mod n of epoch e = g div n, n = ceil(N / batch_size).

    Epoch e takes the rows in the order perm_e, a permutation of range(N) seeded by (seed, e); its batch b holds
    perm_e[b * batch_size : (b + 1) * batch_size], the last one partial when batch_size does not divide N. Every
    epoch therefore visits every row exactly once, whichever process reads which batch: unlike an iterable
    dataset split between workers, nothing depends on how batches are dealt out. A batch's rows are read in
    increasing order (the order inside a batch does not change its mean loss), front to back through the file.

    The memmap and the permutation are made lazily in the process that reads, and never pickled: DataLoader
    workers share the file's pages in the page cache instead of each holding a copy of the data. Each reading
    process does hold the epoch's permutation, 8 bytes a row (0.8 GB at 10^8 rows).
    """

    def __init__(self, buffer: ActivationBuffer, batch_size: int, seed: int):
        self.buffer, self.batch_size, self.seed = buffer, batch_size, seed
        self.batches_per_epoch = -(-buffer.rows // batch_size)
        self._array: np.memmap | None = None
        self._epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_array": None, "_epoch": -1, "_order": np.empty(0, dtype=np.int64)}

    def rows_of(self, index: int) -> np.ndarray:
        epoch, batch = divmod(index, self.batches_per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.buffer.rows)
        return np.sort(self._order[batch * self.batch_size : (batch + 1) * self.batch_size])

    def __getitem__(self, index: int) -> torch.Tensor:
        """The batch's stored rows, their 16 bits as int16 (a dtype every torch op and device copies)."""
        if self._array is None:
            self._array = self.buffer.array()
        return torch.from_numpy(self._array[self.rows_of(index)].view(np.int16))


_END = object()


class BatchStream:
    """The training batches of steps start .. stop - 1 (step t gets item t of ShuffledBatches), as normalized
    float32 tensors on `device`, prepared ahead of the training step on a background thread.

    disk -> RAM: with num_workers = 0 the thread gathers the rows from the memmap itself (numpy releases the GIL
    while it copies, so this overlaps the step); with num_workers > 0, DataLoader worker processes read PREFETCH
    batches ahead each and the thread collects them in order.
    RAM -> GPU (CUDA): the thread pins each batch, copies it on a CUDA stream of its own and converts it there;
    the training stream waits for an event recorded after the conversion, and record_stream keeps the caching
    allocator from handing the batch's memory out again before the step that uses it is done. On a CPU device
    the same thread converts the batch and nothing is copied.
    Use as a context manager, or call close(): it stops the thread and the workers.
    """

    def __init__(self, buffer: ActivationBuffer, batch_size: int, seed: int, start: int, stop: int,
                 num_workers: int = 0, device: torch.device | str = "cpu"):
        self.buffer, self.device = buffer, torch.device(device)
        self.dataset = ShuffledBatches(buffer, batch_size, seed)
        self.num_workers = num_workers
        self.scale = buffer.scale_vector(self.device)
        self._queue: queue.Queue = queue.Queue(maxsize=PREFETCH)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(range(start, stop),), daemon=True)
        self._thread.start()

    def _host_batches(self, indices: range) -> Iterator[torch.Tensor]:
        if self.num_workers == 0:
            return map(self.dataset.__getitem__, indices)
        return iter(torch.utils.data.DataLoader(
            self.dataset, batch_size=None, sampler=indices, num_workers=self.num_workers, prefetch_factor=PREFETCH,
            pin_memory=self.device.type == "cuda"))

    def _produce(self, indices: range) -> None:
        try:
            cuda = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
            if cuda is not None:
                cuda.wait_stream(torch.cuda.current_stream(self.device))  # self.scale was made on that stream
            for raw in self._host_batches(indices):
                if cuda is None:
                    item = (self.buffer.to_float(raw.to(self.device), self.scale), None)
                else:
                    with torch.cuda.stream(cuda):
                        raw = raw if raw.is_pinned() else raw.pin_memory()
                        x = self.buffer.to_float(raw.to(self.device, non_blocking=True), self.scale)
                        ready = torch.cuda.Event()
                        ready.record(cuda)
                    item = (x, ready)
                if not self._put(item):
                    return
            self._put(_END)
        except BaseException as error:  # re-raised in the training thread by __next__
            self._put(error)

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> torch.Tensor:
        item = self._queue.get()
        if item is _END:
            self._queue.put(_END)  # stays exhausted
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        x, ready = item
        if ready is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(ready)
            x.record_stream(stream)
        return x

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.1)  # unblock a producer waiting to put
            except queue.Empty:
                pass
        self._thread.join()

    def __enter__(self) -> BatchStream:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
