"""m-height datasets: exact targets per (n, k, m) group, the course's pickles, balanced subsamples.

Stage `mheight_data` writes artifacts/mheight/dataset.parquet with the schema below (one row per
code: its group, P flattened row-major, and h_m exactly, `inf` where m >= the minimum distance);
stage `mheight_subsample` draws disjoint, balanced train/val sets per group from it.
"""

from __future__ import annotations

import glob
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from labpipe.config import MHeightParams, Params, flatten
from labpipe.device import resolve_device
from labpipe.errors import InputError
from labpipe.files import atomic_path, write_json
from labpipe.inputs import reason
from labpipe.mheight.exact import m_heights_batch

OUT_DIR = Path("artifacts/mheight")
DATASET = OUT_DIR / "dataset.parquet"
TRAIN = OUT_DIR / "train.parquet"
VAL = OUT_DIR / "val.parquet"

SCHEMA = pa.schema(
    [
        pa.field("n", pa.int16()),
        pa.field("k", pa.int16()),
        pa.field("m", pa.int16()),
        pa.field("P", pa.list_(pa.float64())),  # k x (n - k), row-major
        pa.field("height", pa.float64()),  # exact h_m([I_k | P]); inf when m >= d
    ]
)
PICKLE_COLUMNS = ("n", "k", "m", "P", "result")
CODES_PER_TASK = 256  # a task = one seeded chunk of one group; the same chunks whatever the worker count


def groups(params: MHeightParams) -> list[tuple[int, int, int]]:
    """All (n, k, m) with n in params.n, k in params.k, m_min <= m <= n - k (21 groups for the lab's data)."""
    return [(n, k, m) for n in params.n for k in params.k for m in range(params.m_min, n - k + 1)]


# ----------------------------------------------------------------------------- generation


def _generate_task(task: tuple) -> tuple[int, np.ndarray, np.ndarray]:
    group_index, chunk_index, (n, k, m), count, params, device = task
    # One seed per (group, chunk): the dataset depends on params.seed only, not on how it was split.
    rng = np.random.default_rng([params.seed, group_index, chunk_index])
    shape = (count, k, n - k)
    if params.integer_entries:
        bound = int(params.p_max)
        P = rng.integers(-bound, bound + 1, size=shape).astype(np.float64)
    else:
        P = rng.uniform(-params.p_max, params.p_max, size=shape)
    G = np.concatenate([np.broadcast_to(np.eye(k), (count, k, k)), P], axis=2)  # [I_k | P] for every code
    heights = m_heights_batch(G, device=device)[:, m]
    return group_index, P.reshape(count, -1), heights


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)  # parallelism comes from the processes; threads would oversubscribe


def generate(params: MHeightParams) -> pd.DataFrame:
    """samples_per_group random codes per group with exact heights: on a GPU in this process, on the CPU in
    `params.workers` processes. The device is resolved here, once: under `device: auto` a spawned worker
    would otherwise pick CUDA for itself, each opening its own CUDA context."""
    device = str(resolve_device(params.device, "mheight.device"))
    group_list = groups(params)
    tasks = []
    for group_index, group in enumerate(group_list):
        for chunk_index, start in enumerate(range(0, params.samples_per_group, CODES_PER_TASK)):
            count = min(CODES_PER_TASK, params.samples_per_group - start)
            tasks.append((group_index, chunk_index, group, count, params, device))
    results: dict[int, list] = {i: [] for i in range(len(group_list))}
    with tqdm(total=len(group_list) * params.samples_per_group, desc="exact m-heights", unit="code") as bar:
        if params.workers > 1 and device == "cpu":
            ctx = multiprocessing.get_context("spawn")  # fork after torch is imported is unsafe
            with ctx.Pool(params.workers, initializer=_init_worker) as pool:
                for group_index, P, heights in pool.imap(_generate_task, tasks):
                    results[group_index].append((P, heights))
                    bar.update(len(heights))
        else:
            for task in tasks:
                group_index, P, heights = _generate_task(task)
                results[group_index].append((P, heights))
                bar.update(len(heights))
    frames = []
    for group_index, (n, k, m) in enumerate(group_list):
        P = np.concatenate([p for p, _ in results[group_index]])
        heights = np.concatenate([h for _, h in results[group_index]])
        frames.append(pd.DataFrame({"n": n, "k": k, "m": m, "P": list(P), "height": heights}))
    return pd.concat(frames, ignore_index=True)


# ----------------------------------------------------------------------------- the course's pickles


def import_pickles(paths: list[str]) -> pd.DataFrame:
    """Read the course's pickled DataFrames (columns n, k, m, P, result); every record is checked."""
    frames = []
    for path in paths:
        try:
            frame = pd.read_pickle(path)  # the course's own files: a pickle can run code, so only import trusted ones
        except Exception as error:  # noqa: BLE001 - truncated, random, or pickled by an incompatible pandas
            raise InputError(f"{path}: not a readable pickle ({reason(error)})") from None
        if not isinstance(frame, pd.DataFrame):
            raise InputError(f"{path}: expected a pickled pandas DataFrame, got {type(frame).__name__}")
        missing = [c for c in PICKLE_COLUMNS if c not in frame.columns]
        if missing:
            raise InputError(
                f"{path}: missing column(s) {', '.join(missing)}; expected columns {', '.join(PICKLE_COLUMNS)}"
            )
        rows = [validate_record(path, i, r.n, r.k, r.m, r.P, r.result) for i, r in enumerate(frame.itertuples())]
        frames.append(pd.DataFrame(rows, columns=["n", "k", "m", "P", "height"]))
    if not frames:
        raise InputError("no pickles to import")
    return pd.concat(frames, ignore_index=True)


def validate_record(source: str, index: int, n, k, m, P, height) -> tuple:
    """One (n, k, m, P, height) record, or a ValueError that names the source, the record and the reason."""
    where = f"{source} record {index}"
    try:
        n, k, m = int(n), int(k), int(m)
    except (TypeError, ValueError):
        raise InputError(f"{where}: n, k, m must be integers, got {n!r}, {k!r}, {m!r}") from None
    if not 0 < k < n:
        raise InputError(f"{where}: need 0 < k < n, got n={n}, k={k}")
    if not 0 <= m < n:
        raise InputError(f"{where}: m={m} is outside 0..{n - 1} for n={n}")
    P = np.asarray(P, dtype=np.float64)
    if P.shape != (k, n - k):
        raise InputError(f"{where}: P has shape {P.shape}, expected ({k}, {n - k}) for n={n}, k={k}")
    if not np.isfinite(P).all():
        bad = tuple(int(i) for i in np.argwhere(~np.isfinite(P))[0])
        raise InputError(f"{where}: P{list(bad)} = {P[bad]} is not finite")
    height = float(height)
    if np.isnan(height) or height < 1:
        raise InputError(f"{where}: height {height} is not a valid m-height (>= 1, inf allowed)")
    return n, k, m, P.reshape(-1), height


# ----------------------------------------------------------------------------- files


def write_dataset(frame: pd.DataFrame, path: str | Path) -> None:
    table = pa.Table.from_pandas(frame[["n", "k", "m", "P", "height"]], schema=SCHEMA, preserve_index=False)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_dataset(path: str | Path) -> pd.DataFrame:
    """A dataset this stage wrote (or one in its format), checked: the schema, finite P, no NaN height."""
    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (OSError, pa.ArrowException) as error:
        raise InputError(f"{path}: not a readable Parquet file ({reason(error)})") from None
    schema = table.schema.remove_metadata()
    if schema != SCHEMA:
        def columns(s: pa.Schema) -> str:
            return ", ".join(f"{f.name}: {f.type}" for f in s)

        raise InputError(f"{path}: columns ({columns(schema)}) are not labpipe's ({columns(SCHEMA)})")
    frame = table.to_pandas()
    k, n = frame["k"].to_numpy(int), frame["n"].to_numpy(int)
    sizes = frame["P"].map(len).to_numpy(int)
    entries = np.concatenate(frame["P"].to_numpy()) if len(frame) else np.zeros(0)
    infinite = np.flatnonzero(~np.isfinite(entries))
    wrong = np.flatnonzero(sizes != k * (n - k))
    if infinite.size or wrong.size:
        rows = [*wrong[:1], *np.searchsorted(np.cumsum(sizes), infinite[:1], side="right")]
        row = int(min(rows))
        raise InputError(f"{path} row {row}: P must hold k(n-k) = {k[row] * (n[row] - k[row])} finite numbers")
    if frame["height"].isna().any():
        raise InputError(f"{path} row {int(frame['height'].isna().to_numpy().argmax())}: height is NaN")
    return frame


def group_stats(frame: pd.DataFrame) -> dict[str, dict[str, int]]:
    stats = {}
    for (n, k, m), rows in frame.groupby(["n", "k", "m"]):
        stats[f"n{n}_k{k}_m{m}"] = {"rows": len(rows), "infinite": int(np.isinf(rows["height"]).sum())}
    return stats


# ----------------------------------------------------------------------------- stages


def run_data(params: Params) -> None:
    """Stage mheight_data: the course's pickles when present (source=auto), else generated codes."""
    from labpipe.tracking import stage_run

    p = params.mheight
    pickles = sorted(glob.glob(os.path.join(p.import_dir, "*.pkl")))
    use_pickles = p.source == "pickles" or (p.source == "auto" and pickles)
    if p.source == "pickles" and not pickles:
        raise InputError(f"mheight.source=pickles but {p.import_dir} holds no *.pkl files")
    with stage_run(params.tracking, "mheight_data", flatten(params.mheight, "mheight.")) as run:
        start = time.perf_counter()
        frame = import_pickles(pickles) if use_pickles else generate(p)
        seconds = time.perf_counter() - start
        write_dataset(frame, DATASET)
        stats = {
            "rows": len(frame),
            "infinite": int(np.isinf(frame["height"]).sum()),
            "source": "pickles" if use_pickles else "generated",
            "groups": group_stats(frame),
        }
        write_json(OUT_DIR / "data_stats.json", stats)
        run.log_metrics({"rows": len(frame), "infinite": stats["infinite"], "seconds": seconds,
                         "codes_per_second": len(frame) / max(seconds, 1e-9)}, step=0)
        run.set_tags({"mheight.source": stats["source"]})
        run.log_artifact(OUT_DIR / "data_stats.json")
        run.log_outputs([DATASET, OUT_DIR / "data_stats.json"])


def subsample(frame: pd.DataFrame, train_per_group: int, val_per_group: int, seed: int):
    """Disjoint, balanced train/val rows per group, seeded: the same inputs give the same split."""
    train, val = [], []
    for group_index, ((n, k, m), rows) in enumerate(frame.groupby(["n", "k", "m"], sort=True)):
        need = train_per_group + val_per_group
        if len(rows) < need:
            raise InputError(
                f"group n={n} k={k} m={m} has {len(rows)} rows, fewer than "
                f"train_per_group + val_per_group = {need}"
            )
        order = np.random.default_rng([seed, group_index]).permutation(len(rows))
        train.append(rows.iloc[order[:train_per_group]])
        val.append(rows.iloc[order[train_per_group:need]])
    return pd.concat(train, ignore_index=True), pd.concat(val, ignore_index=True)


def run_subsample(params: Params) -> None:
    """Stage mheight_subsample."""
    from labpipe.tracking import stage_run

    p = params.mheight
    keys = {k: v for k, v in flatten(p, "mheight.").items()
            if k in ("mheight.seed", "mheight.train_per_group", "mheight.val_per_group")}
    with stage_run(params.tracking, "mheight_subsample", keys) as run:
        train, val = subsample(read_dataset(DATASET), p.train_per_group, p.val_per_group, p.seed)
        write_dataset(train, TRAIN)
        write_dataset(val, VAL)
        run.log_metrics({"train_rows": len(train), "val_rows": len(val)}, step=0)
        run.log_outputs([TRAIN, VAL])
