"""m-height datasets: exact targets per (n, k, m) group, the course's pickles, balanced subsamples.

Stage `mheight_data` writes artifacts/mheight/dataset.parquet with the schema below (one row per
code: its group, P flattened row-major, h_m exactly, `inf` where m >= the minimum distance, a sampled
lower bound on h_m, and the course's split); stage `mheight_subsample` draws disjoint, balanced
train/val/test sets per group from it.

Splits. Generated codes are unassigned (split ""). An imported pickle's split comes from its file name:
the name without .pkl, lower-cased, is cut into words at every non-letter; the word "train" makes it
train, "val", "valid" or "validation" val, "test" test. A name with none of these words, or with words
of two splits, is unassigned: course_train_2024.pkl -> train, mheight-Valid.pkl -> val, training.pkl,
train_test.pkl and all.pkl -> "".

Random streams, all from mheight.seed and none from the worker count or how work is split: generation
[seed, group, chunk], the sampled bound [seed, BOUND_STREAM, chunk] (chunks of CODES_PER_TASK dataset
rows by position), the import check's sample [seed, VERIFY_STREAM], the subsample [seed, group].
"""

from __future__ import annotations

import glob
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
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
TEST = OUT_DIR / "test.parquet"

SCHEMA = pa.schema(
    [
        pa.field("n", pa.int16()),
        pa.field("k", pa.int16()),
        pa.field("m", pa.int16()),
        pa.field("P", pa.list_(pa.float64())),  # k x (n - k), row-major
        pa.field("height", pa.float64()),  # exact h_m([I_k | P]); inf when m >= d
        pa.field("bound", pa.float64()),  # max h_m(xG) over mheight.violation_samples random x: <= height
        pa.field("split", pa.string()),  # "train", "val", "test", or "" (unassigned)
    ]
)
SPLITS = ("train", "val", "test")
SPLIT_WORDS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
PICKLE_COLUMNS = ("n", "k", "m", "P", "result")
CODES_PER_TASK = 256  # a task = one seeded chunk of one group; the same chunks whatever the worker count
BOUND_STREAM = 0x626F756E  # "boun", VERIFY_STREAM "veri": stream tags far above any group index
VERIFY_STREAM = 0x76657269
VERIFY_RTOL = 1e-6  # a stored height further than this (relative) from the exact one is reported


def groups(params: MHeightParams) -> list[tuple[int, int, int]]:
    """All (n, k, m) with n in params.n, k in params.k, m_min <= m <= n - k (21 groups for the lab's data)."""
    return [(n, k, m) for n in params.n for k in params.k for m in range(params.m_min, n - k + 1)]


def generators(P: np.ndarray) -> np.ndarray:
    """[I_k | P] for a batch of parity parts P (B, k, n - k) -> (B, k, n)."""
    count, k, _ = P.shape
    return np.concatenate([np.broadcast_to(np.eye(k), (count, k, k)), P], axis=2)


def exact_device(params: MHeightParams) -> str:
    """mheight.device, resolved once (`auto`: CUDA when present), a missing device named as mheight.device."""
    return str(resolve_device(params.device, "mheight.device"))


# ----------------------------------------------------------------------------- generation


def _generate_chunk(params: MHeightParams, group_index: int, chunk_index: int, group: tuple, count: int,
                    device: str) -> tuple[np.ndarray, np.ndarray]:
    n, k, m = group
    # One seed per (group, chunk): the dataset depends on params.seed only, not on how it was split.
    rng = np.random.default_rng([params.seed, group_index, chunk_index])
    shape = (count, k, n - k)
    if params.integer_entries:
        bound = int(params.p_max)
        P = rng.integers(-bound, bound + 1, size=shape).astype(np.float64)
    else:
        P = rng.uniform(-params.p_max, params.p_max, size=shape)
    heights = m_heights_batch(generators(P), device=device)[:, m]
    return P.reshape(count, -1), heights


def generate(params: MHeightParams) -> pd.DataFrame:
    """samples_per_group random codes per group with exact heights, unassigned to any split, computed in this
    process: on the CPU the kernel threads over each chunk's codes, on a GPU the torch path batches them."""
    device = exact_device(params)
    group_list = groups(params)
    results: dict[int, list] = {i: [] for i in range(len(group_list))}
    with tqdm(total=len(group_list) * params.samples_per_group, desc="exact m-heights", unit="code") as bar:
        for group_index, group in enumerate(group_list):
            for chunk_index, start in enumerate(range(0, params.samples_per_group, CODES_PER_TASK)):
                count = min(CODES_PER_TASK, params.samples_per_group - start)
                P, heights = _generate_chunk(params, group_index, chunk_index, group, count, device)
                results[group_index].append((P, heights))
                bar.update(count)
    frames = []
    for group_index, (n, k, m) in enumerate(group_list):
        P = np.concatenate([p for p, _ in results[group_index]])
        heights = np.concatenate([h for _, h in results[group_index]])
        frames.append(pd.DataFrame({"n": n, "k": k, "m": m, "P": list(P), "height": heights, "split": ""}))
    return pd.concat(frames, ignore_index=True)


# ----------------------------------------------------------------------------- sampled lower bounds


def _chunk_bounds(rng: np.random.Generator, n, k, m, P, samples: int) -> np.ndarray:
    # One draw for the whole chunk before grouping it: a row's messages are the first k of k.max() entries.
    x = rng.standard_normal((len(n), samples, k.max()))
    bounds = np.empty(len(n))
    for code_n, code_k in sorted(set(zip(n.tolist(), k.tolist(), strict=True))):
        rows = np.flatnonzero((n == code_n) & (k == code_k))
        G = generators(np.stack(P[rows]).reshape(len(rows), code_k, code_n - code_k))
        c = np.sort(np.abs(x[rows, :, :code_k] @ G), axis=2)  # |xG| ascending: |c|_(j) is c[..., n - 1 - j]
        mth = np.take_along_axis(c, (code_n - 1 - m[rows])[:, None, None], axis=2)[..., 0]
        with np.errstate(divide="ignore"):
            bounds[rows] = (c[..., -1] / mth).max(axis=1)  # inf where |c|_(m) = 0
    return bounds


def sampled_bounds(frame: pd.DataFrame, samples: int, seed: int, workers: int = 1) -> np.ndarray:
    """Per row, the largest h_m(xG) over `samples` messages x ~ N(0, I_k), G = [I_k | P]: a lower bound on
    h_m(G), the max over all x != 0; 1.0 (h_m >= 1 always) when samples = 0. The rows are cut by position
    into chunks of CODES_PER_TASK, each with its own seeded stream, so the column depends on the seed and the
    rows only, not on `workers` (threads: numpy's sort and matmul release the GIL)."""
    bounds = np.ones(len(frame))
    if samples == 0:
        return bounds
    n, k, m = (frame[column].to_numpy(np.int64) for column in ("n", "k", "m"))
    P = frame["P"].to_numpy()

    def chunk(start: int) -> tuple[int, np.ndarray]:
        rows = slice(start, start + CODES_PER_TASK)
        rng = np.random.default_rng([seed, BOUND_STREAM, start // CODES_PER_TASK])
        return start, _chunk_bounds(rng, n[rows], k[rows], m[rows], P[rows], samples)

    with ThreadPoolExecutor(workers) as pool, tqdm(total=len(frame), desc="sampled bounds", unit="code") as bar:
        for start, chunk_bounds in pool.map(chunk, range(0, len(frame), CODES_PER_TASK)):
            bounds[start:start + len(chunk_bounds)] = chunk_bounds
            bar.update(len(chunk_bounds))
    return bounds


# ----------------------------------------------------------------------------- the course's pickles


def split_of(path: str) -> str:
    """The split a pickle's file name names ("" for none or several; the rule is in the module docstring)."""
    named = {SPLIT_WORDS[word] for word in re.split(r"[^a-z]+", Path(path).stem.lower()) if word in SPLIT_WORDS}
    return named.pop() if len(named) == 1 else ""


def import_pickles(paths: list[str]) -> pd.DataFrame:
    """Read the course's pickled DataFrames (columns n, k, m, P, result); every record is checked. Each row
    keeps its `split` (from the file name) and, for the import check's reports, its `file` and `record`."""
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
        frame = pd.DataFrame(rows, columns=["n", "k", "m", "P", "height"])
        frames.append(frame.assign(split=split_of(path), file=path, record=np.arange(len(frame))))
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


def verify_imported(frame: pd.DataFrame, count: int, seed: int, device: str) -> dict:
    """Recompute the exact height of `count` imported records (all when fewer, else a seeded sample) and
    report each stored height further than VERIFY_RTOL (relative) from it; inf matches only inf.
    Returns {"checked", "mismatched", "examples": the first 20 as {file, record, n, k, m, stored, exact}}."""
    if count < len(frame):
        picked = np.sort(np.random.default_rng([seed, VERIFY_STREAM]).choice(len(frame), count, replace=False))
        frame = frame.iloc[picked]
    exact = np.empty(len(frame))
    m = frame["m"].to_numpy()
    with tqdm(total=len(frame), desc="verify imported heights", unit="code") as bar:
        for (n, k), rows in frame.groupby(["n", "k"]).indices.items():
            P = np.stack(frame["P"].to_numpy()[rows]).reshape(len(rows), k, n - k)
            exact[rows] = m_heights_batch(generators(P), device=device)[np.arange(len(rows)), m[rows]]
            bar.update(len(rows))
    stored = frame["height"].to_numpy()
    with np.errstate(invalid="ignore"):  # inf - inf
        off = np.abs(stored - exact) > VERIFY_RTOL * np.abs(exact)
    mismatched = np.flatnonzero(np.where(np.isinf(stored) | np.isinf(exact), stored != exact, off))
    examples = [{"file": row.file, "record": int(row.record), "n": int(row.n), "k": int(row.k), "m": int(row.m),
                 "stored": float(row.height), "exact": float(exact[i])}
                for i, row in zip(mismatched[:20], frame.iloc[mismatched[:20]].itertuples(), strict=True)]
    for e in examples[:10]:
        tqdm.write(f"{e['file']} record {e['record']}: stored height {e['stored']:.10g}, exact {e['exact']:.10g}")
    tqdm.write(f"verify_imported: {len(mismatched)} of {len(frame)} checked records differ from the exact height "
               f"by more than {VERIFY_RTOL:g} relative")
    return {"checked": len(frame), "mismatched": len(mismatched), "examples": examples}


# ----------------------------------------------------------------------------- files


def write_dataset(frame: pd.DataFrame, path: str | Path) -> None:
    table = pa.Table.from_pandas(frame[SCHEMA.names], schema=SCHEMA, preserve_index=False)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_dataset(path: str | Path) -> pd.DataFrame:
    """A dataset this stage wrote (or one in its format), checked: the schema, finite P, no NaN height or
    bound, a known split."""
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
    for column in ("height", "bound"):
        if frame[column].isna().any():
            raise InputError(f"{path} row {int(frame[column].isna().to_numpy().argmax())}: {column} is NaN")
    unknown = ~frame["split"].isin(["", *SPLITS]).to_numpy()
    if unknown.any():
        row = int(unknown.argmax())
        raise InputError(f"{path} row {row}: split {frame['split'][row]!r} is not one of train, val, test or ''")
    return frame


def group_stats(frame: pd.DataFrame) -> dict[str, dict]:
    """Per group its size, infinite heights, and how hard it is: mean and population std (ddof=0) of log2 h
    over the finite heights, and the mean gap log2 h - log2 bound over them (None where no height is finite)."""
    stats = {}
    for (n, k, m), rows in frame.groupby(["n", "k", "m"]):
        finite = rows[np.isfinite(rows["height"])]
        log2_h = np.log2(finite["height"].to_numpy())
        gap = log2_h - np.log2(finite["bound"].to_numpy())
        defined = len(finite) > 0
        stats[f"n{n}_k{k}_m{m}"] = {
            "rows": len(rows),
            "infinite": len(rows) - len(finite),
            "share_infinite": (len(rows) - len(finite)) / len(rows),
            "m_over_k": m / k,
            "log2_h_mean": float(log2_h.mean()) if defined else None,
            "log2_h_std": float(log2_h.std()) if defined else None,
            "mean_log2_bound_gap": float(gap.mean()) if defined else None,
        }
    return stats


def difficulty_correlation(groups: dict[str, dict]) -> float | None:
    """Pearson r between m/k and log2_h_std over the groups where the std is defined; None when r is undefined
    (fewer than two such groups, or either side constant). The seed found high-m/k groups harder (r ~ 0.85)."""
    pairs = np.array([(g["m_over_k"], g["log2_h_std"]) for g in groups.values() if g["log2_h_std"] is not None])
    if len(pairs) < 2 or (np.ptp(pairs, axis=0) == 0).any():
        return None
    return float(np.corrcoef(pairs.T)[0, 1])


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
        frame["bound"] = sampled_bounds(frame, p.violation_samples, p.seed, p.workers)
        stats = {
            "rows": len(frame),
            "infinite": int(np.isinf(frame["height"]).sum()),
            "source": "pickles" if use_pickles else "generated",
            "groups": group_stats(frame),
        }
        stats["corr_m_over_k_log2_h_std"] = difficulty_correlation(stats["groups"])
        metrics = {"rows": len(frame), "infinite": stats["infinite"], "seconds": seconds,
                   "codes_per_second": len(frame) / max(seconds, 1e-9)}
        metrics |= {f"log2_h_std/{name}": g["log2_h_std"] for name, g in stats["groups"].items()
                    if g["log2_h_std"] is not None}
        if stats["corr_m_over_k_log2_h_std"] is not None:
            metrics["corr_m_over_k_log2_h_std"] = stats["corr_m_over_k_log2_h_std"]
        if use_pickles and p.verify_imported:
            stats["verify"] = verify_imported(frame, p.verify_imported, p.seed, exact_device(p))
            metrics["verify_mismatched"] = stats["verify"]["mismatched"]
        write_dataset(frame, DATASET)
        write_json(OUT_DIR / "data_stats.json", stats)
        run.log_metrics(metrics, step=0)
        run.set_tags({"mheight.source": stats["source"]})
        run.log_artifact(OUT_DIR / "data_stats.json")
        run.log_outputs([DATASET, OUT_DIR / "data_stats.json"])


def _too_few(group: tuple, have: int, splits: list[str], sizes: dict[str, int], unassigned: bool) -> InputError:
    splits = [s for s in splits if sizes[s]]
    what = f"unassigned rows for {' + '.join(splits)}" if unassigned else f"{splits[0]} rows"
    keys = " + ".join(f"mheight.{s}_per_group" for s in splits)
    hint = " (set mheight.test_per_group=0 for no test split)" if "test" in splits else ""
    n, k, m = group
    return InputError(f"group n={n} k={k} m={m} has {have} {what}, fewer than {keys} = "
                      f"{sum(sizes[s] for s in splits)}{hint}")


def subsample(frame: pd.DataFrame, train_per_group: int, val_per_group: int, test_per_group: int, seed: int):
    """Disjoint, balanced train/val/test rows per group, seeded: the same inputs give the same sets, each row
    with `split` set to the set it went to. A split draws from the dataset's rows of that split when it has
    any, else from the unassigned rows, shared out train first, then val, then test, from one permutation per
    group (the draw labpipe made before splits, for train/val from unassigned rows)."""
    sizes = {"train": train_per_group, "val": val_per_group, "test": test_per_group}
    assigned = [s for s in SPLITS if (frame["split"] == s).any()]
    shared = [s for s in SPLITS if s not in assigned]
    drawn = {s: [] for s in SPLITS}
    for group_index, (group, rows) in enumerate(frame.groupby(["n", "k", "m"], sort=True)):
        rng = np.random.default_rng([seed, group_index])
        unassigned = rows[rows["split"] == ""]
        if len(unassigned) < sum(sizes[s] for s in shared):
            raise _too_few(group, len(unassigned), shared, sizes, unassigned=True)
        order, start = rng.permutation(len(unassigned)), 0
        for s in shared:
            drawn[s].append(unassigned.iloc[order[start:start + sizes[s]]])
            start += sizes[s]
        for s in assigned:
            own = rows[rows["split"] == s]
            if len(own) < sizes[s]:
                raise _too_few(group, len(own), [s], sizes, unassigned=False)
            drawn[s].append(own.iloc[rng.permutation(len(own))[:sizes[s]]])
    return tuple(pd.concat(drawn[s], ignore_index=True).assign(split=s) for s in SPLITS)


def run_subsample(params: Params) -> None:
    """Stage mheight_subsample."""
    from labpipe.tracking import stage_run

    p = params.mheight
    keys = {k: v for k, v in flatten(p, "mheight.").items()
            if k in ("mheight.seed", "mheight.train_per_group", "mheight.val_per_group", "mheight.test_per_group")}
    with stage_run(params.tracking, "mheight_subsample", keys) as run:
        sets = subsample(read_dataset(DATASET), p.train_per_group, p.val_per_group, p.test_per_group, p.seed)
        for rows, path in zip(sets, (TRAIN, VAL, TEST), strict=True):
            write_dataset(rows, path)
        run.log_metrics({f"{s}_rows": len(rows) for s, rows in zip(SPLITS, sets, strict=True)}, step=0)
        run.log_outputs([TRAIN, VAL, TEST])
