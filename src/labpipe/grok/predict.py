"""labpipe mheight-predict: m-heights of codes from a trained regressor, optionally against the exact ones.

    labpipe mheight-predict codes.parquet --exact --out predictions.parquet
    labpipe mheight-predict --random 10000 --n 10 --k 5 --m 3 --model artifacts/grok/model.pt

The codes are a file (see read_codes) or random ones drawn like the lab's data; the model is a grok_train
model.pt or an MLflow model URI, by default the registered champion. The output holds n, k, m, P,
predicted_height and predicted_log2; --exact adds exact_height (labpipe.mheight) and log2_error =
predicted_log2 - log2 exact_height (NaN where the height is infinite: m >= the minimum distance, where no
finite prediction has an error), and writes the per-group errors as JSON beside the output.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from labpipe.config import GrokParams, build
from labpipe.errors import InputError, UserError
from labpipe.grok.features import FeatureLayout, features
from labpipe.grok.models import build_model, log2_prediction
from labpipe.inputs import is_model_uri, load_torch, reason

CHAMPION = "models:/mheight-regressor@champion"
COLUMNS = ("n", "k", "m", "P")
GROUP = ["n", "k", "m"]

# ----------------------------------------------------------------------------- the model


def load_regressor(source: str) -> nn.Module:
    """The regressor in `source`: a grok_train model.pt, or an MLflow model URI (models:/name@alias,
    runs:/id/model) whose logged module carries .layout and .output_head. On the CPU, in eval mode."""
    model = _load_logged(source) if is_model_uri(source) else _load_model_file(Path(source))
    return model.eval()


def _load_logged(source: str) -> nn.Module:
    from labpipe.tracking import load_logged_model

    model = load_logged_model(source)
    if not isinstance(model, nn.Module) or not isinstance(getattr(model, "layout", None), FeatureLayout) \
            or not hasattr(model, "output_head"):
        raise InputError(f"{source}: not an m-height regressor with its feature layout (logged by an older "
                         "labpipe, or by another stage)")
    return model


def _load_model_file(path: Path) -> nn.Module:
    saved = load_torch(path, "grok_train model file", keys=("model", "layout", "params"))
    if isinstance(saved["params"], dict):
        missing = [f.name for f in dataclasses.fields(GrokParams) if f.name not in saved["params"]]
        if missing:
            raise InputError(f"{path}: written by an older labpipe (its params lack grok.{missing[0]}): "
                             "train it again with labpipe grok-train")
    params = build(GrokParams, saved["params"], where=str(path), prefix="grok.")
    try:
        layout = FeatureLayout.from_dict(saved["layout"])
    except (KeyError, TypeError, ValueError) as error:
        raise InputError(f"{path}: its feature layout is not labpipe's ({reason(error)})") from None
    model = build_model(params, layout)
    try:
        model.load_state_dict(saved["model"])
    except RuntimeError as error:
        raise InputError(f"{path}: its weights do not fit its params ({reason(error)})") from None
    return model


@torch.no_grad()
def infer_log2(model: nn.Module, x: np.ndarray, device: torch.device, batch: int = 65536) -> np.ndarray:
    """float64 log2 h_hat of encoded codes x (features()), in batches on `device` (the model moves there)."""
    model.to(device).eval()
    parts = []
    for start in range(0, len(x), batch):
        z, _aux = model(torch.from_numpy(x[start:start + batch]).to(device))
        parts.append(log2_prediction(z, model.output_head).double().cpu().numpy())
    return np.concatenate(parts) if parts else np.empty(0)


def predict_log2(model: nn.Module, frame: pd.DataFrame, device: torch.device, batch: int = 65536) -> np.ndarray:
    """float64 log2 h_hat of every row of a frame with columns n, k, m, P (P flattened row-major)."""
    return infer_log2(model, features(frame, model.layout)[0], device, batch)


# ----------------------------------------------------------------------------- codes


def random_codes(count: int, n: int, k: int, m: int, seed: int, p_max: int = 100) -> pd.DataFrame:
    """`count` codes [I_k | P] of group (n, k, m), P integer in [-p_max, p_max] like the lab's data; the
    same (seed, n, k, m) gives the same codes."""
    if not 0 < k < n or not 0 <= m < n:
        raise InputError(f"random codes need 0 < k < n and 0 <= m < n, got n={n}, k={k}, m={m}")
    if count < 1 or seed < 0:
        raise InputError(f"random codes need a count of at least 1 and a seed >= 0, got {count} and {seed}")
    rng = np.random.default_rng([seed, n, k, m])
    P = rng.integers(-p_max, p_max + 1, size=(count, k * (n - k))).astype(np.float64)
    return pd.DataFrame({"n": n, "k": k, "m": m, "P": list(P)})


def read_codes(path: str | Path, m: int | None = None) -> pd.DataFrame:
    """Codes from a file, as a frame with columns n, k, m, P (float64, flattened row-major):
    .parquet: columns n, k, m, P (a list column; other columns, like a dataset's height, are ignored);
    .csv: columns n, k, m, P with P a JSON list, e.g. "[3, -41, 7, ...]" (what --out .csv writes);
    .npy: an (N, k, n-k) array of P matrices, all of group (n, k, m), m given here (the file cannot say it)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return _read_npy(path, m)
    if m is not None:
        raise InputError(f"{path}: --m is for a .npy input; a {suffix} file has its own m column")
    if suffix == ".parquet":
        frame = _read_parquet(path)
    elif suffix == ".csv":
        frame = _read_csv(path)
    else:
        raise InputError(f"{path}: codes must be a .parquet, .csv or .npy file")
    return _checked(frame, path)


def _read_parquet(path: Path) -> pd.DataFrame:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
        _require_columns(names, path)
        return pq.read_table(path, columns=list(COLUMNS)).to_pandas()
    except (OSError, pa.ArrowException) as error:
        raise InputError(f"{path}: not a readable Parquet file ({reason(error)})") from None


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        _require_columns(pd.read_csv(path, nrows=0).columns, path)
        frame = pd.read_csv(path, usecols=list(COLUMNS), dtype={"P": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: not a readable CSV file ({reason(error)})") from None
    P = []
    for row, text in enumerate(frame["P"]):
        try:
            P.append(json.loads(text))
        except (TypeError, json.JSONDecodeError):
            raise InputError(f"{path} row {row}: P must be a JSON list of numbers, got {text!r}") from None
    return frame.assign(P=P)


def _require_columns(names, path: Path) -> None:
    missing = [c for c in COLUMNS if c not in names]
    if missing:
        raise InputError(f"{path}: no column(s) {', '.join(missing)}; codes need columns {', '.join(COLUMNS)}")


def _read_npy(path: Path, m: int | None) -> pd.DataFrame:
    if m is None:
        raise InputError(f"{path}: a .npy of P matrices does not say m: give --m")
    try:
        P = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: not a readable .npy file ({reason(error)})") from None
    if P.ndim != 3 or 0 in P.shape[1:] or not np.issubdtype(P.dtype, np.number):
        raise InputError(f"{path}: an array of shape {P.shape} ({P.dtype}); expected (N, k, n-k) numbers, the P "
                         "of codes [I_k | P]")
    count, k, r = P.shape
    frame = pd.DataFrame({"n": k + r, "k": k, "m": m, "P": list(P.reshape(count, k * r).astype(np.float64))})
    return _checked(frame, path)


def _checked(frame: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Integer n, k, m with 0 < k < n, and P of k(n-k) finite numbers in every row; row numbers from 0."""
    if frame.empty:
        raise InputError(f"{path}: holds no codes")
    frame = frame.reset_index(drop=True)
    for column in GROUP:
        values = pd.to_numeric(frame[column], errors="coerce").to_numpy(np.float64)
        bad = np.flatnonzero(~np.isfinite(values) | (values != np.round(values)))
        if bad.size:
            raise InputError(f"{path} row {bad[0]}: {column} must be an integer, got {frame[column][bad[0]]!r}")
        frame[column] = values.astype(np.int64)
    n, k = frame["n"].to_numpy(), frame["k"].to_numpy()
    if (bad := np.flatnonzero((k <= 0) | (k >= n))).size:
        raise InputError(f"{path} row {bad[0]}: need 0 < k < n, got n={n[bad[0]]}, k={k[bad[0]]}")
    P = []
    for row, (entries, size) in enumerate(zip(frame["P"], k * (n - k), strict=True)):
        try:
            entries = np.asarray(entries, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            entries = None
        if entries is None or entries.size != size or not np.isfinite(entries).all():
            raise InputError(f"{path} row {row}: P must hold k(n-k) = {size} finite numbers")
        P.append(entries)
    return frame.assign(P=P)


# ----------------------------------------------------------------------------- exact heights and errors


def exact_heights(frame: pd.DataFrame, device: torch.device) -> np.ndarray:
    """h_m([I_k | P]) of every row, exactly (labpipe.mheight.m_heights_batch); inf where m >= d."""
    from labpipe.mheight import m_heights_batch
    from labpipe.mheight.data import generators

    heights = np.empty(len(frame))
    chunk = 4096 if device.type == "cuda" else 256  # m_heights_batch's advice: a GPU wants larger chunks
    for (n, k, m), rows in frame.groupby(GROUP, sort=False).indices.items():
        P = np.stack(frame["P"].to_numpy()[rows]).reshape(len(rows), k, n - k)
        heights[rows] = m_heights_batch(generators(P), device=device, chunk=chunk)[:, m]
    return heights


def group_errors(out: pd.DataFrame) -> dict[str, dict]:
    """Per group and over all rows: rows, infinite heights (left out of the errors), the log2-MSE of the
    prediction and the share of predictions below the exact height; None where no height is finite."""

    def summary(rows: pd.DataFrame) -> dict:
        error = rows["log2_error"][np.isfinite(rows["exact_height"])]
        finite = len(error) > 0
        return {"rows": len(rows), "infinite": len(rows) - len(error),
                "log2_mse": float((error ** 2).mean()) if finite else None,
                "below_exact": float((error < 0).mean()) if finite else None}

    errors = {f"n{n}_k{k}_m{m}": summary(rows) for (n, k, m), rows in out.groupby(GROUP, sort=True)}
    errors["all"] = summary(out)
    return errors


# ----------------------------------------------------------------------------- the CLI


def predict(model: nn.Module, frame: pd.DataFrame, device: torch.device, batch: int = 65536,
            exact: bool = False) -> tuple[pd.DataFrame, dict[tuple[int, int, int], float]]:
    """The output frame (in the input's row order) and each group's network throughput in codes/s. Rows are
    batched per group, so a prediction can differ in its last float32 bit from predict_log2's on the same
    frame: the BLAS kernel, and with it the rounding, depends on the batch."""
    grouped = frame.groupby(GROUP, sort=True).indices
    # One row per group, encoded up front: an unknown group fails before any work, and the network is warm
    # (CUDA context, kernels) before it is timed.
    probe = features(frame.iloc[[rows[0] for rows in grouped.values()]], model.layout)[0]
    infer_log2(model, probe, device, batch)
    log2_hat = np.empty(len(frame))
    seconds = dict.fromkeys(grouped, 0.0)
    with tqdm(total=len(frame), desc="network", unit="code", disable=len(frame) <= batch) as bar:
        for group, rows in grouped.items():
            for start in range(0, len(rows), batch):
                chunk = rows[start:start + batch]
                x = features(frame.iloc[chunk], model.layout)[0]
                started = time.perf_counter()
                log2_hat[chunk] = infer_log2(model, x, device, batch)  # .cpu() inside: the GPU has finished
                seconds[group] += time.perf_counter() - started
                bar.update(len(chunk))
    out = frame[list(COLUMNS)].assign(predicted_height=np.exp2(log2_hat), predicted_log2=log2_hat)
    if exact:
        exact_height = np.empty(len(frame))
        step = 4096  # ~1e3 codes/s on a CPU: the bar moves every few seconds
        with tqdm(total=len(frame), desc="exact m-heights", unit="code", disable=len(frame) <= step) as bar:
            for start in range(0, len(frame), step):
                exact_height[start:start + step] = exact_heights(frame.iloc[start:start + step], device)
                bar.update(min(step, len(frame) - start))
        with np.errstate(divide="ignore"):
            error = log2_hat - np.log2(exact_height)
        out = out.assign(exact_height=exact_height, log2_error=np.where(np.isfinite(exact_height), error, np.nan))
    rates = {group: len(rows) / max(seconds[group], 1e-12) for group, rows in grouped.items()}
    return out, rates


def write_predictions(out: pd.DataFrame, path: Path) -> None:
    """Parquet (P a list column) or CSV (P a JSON list, which read_codes reads back), written atomically."""
    from labpipe.files import atomic_path

    with atomic_path(path) as tmp:
        if path.suffix == ".csv":
            out.assign(P=[json.dumps(np.asarray(p).tolist()) for p in out["P"]]).to_csv(tmp, index=False)
        else:
            out.assign(P=[np.asarray(p).tolist() for p in out["P"]]).to_parquet(tmp, index=False)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="labpipe mheight-predict", description=__doc__.splitlines()[0])
    parser.add_argument("input", nargs="?", help=".parquet or .csv with columns n, k, m, P (CSV: P a JSON list), "
                        "or .npy of (N, k, n-k) P matrices with --m")
    parser.add_argument("--random", type=int, metavar="N", help="N random codes of group (--n, --k, --m) instead")
    parser.add_argument("--n", type=int, default=10, help="--random: code length (default 10)")
    parser.add_argument("--k", type=int, default=5, help="--random: dimension (default 5)")
    parser.add_argument("--m", type=int, help="the m of --random codes (default 3) or of a .npy input (required)")
    parser.add_argument("--seed", type=int, default=0, help="--random: seed (default 0)")
    parser.add_argument("--model", default=CHAMPION, help=f"a grok_train model.pt or an MLflow model URI "
                        f"(default {CHAMPION})")
    parser.add_argument("--exact", action="store_true", help="also the exact heights, the errors, and a JSON of them")
    parser.add_argument("--out", default="predictions.parquet", help=".parquet or .csv (default predictions.parquet)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    parser.add_argument("--batch", type=int, default=65536, help="codes per forward pass (default 65536)")
    args = parser.parse_args(argv)
    if (args.input is None) == (args.random is None):
        parser.error("give either an INPUT file or --random N")
    try:
        out_path = Path(args.out)
        if out_path.suffix not in (".parquet", ".csv"):
            raise InputError(f"--out {args.out}: must end in .parquet or .csv")
        if args.batch < 1:
            raise InputError(f"--batch {args.batch}: must be at least 1")
        from labpipe.device import resolve_device

        device = resolve_device(args.device, "--device")
        if args.input is None:
            frame = random_codes(args.random, args.n, args.k, 3 if args.m is None else args.m, args.seed)
        else:
            frame = read_codes(args.input, args.m)
        model = load_regressor(args.model)
        try:
            out, rates = predict(model, frame, device, args.batch, args.exact)
        except InputError as error:  # a group the model was not trained on: say which model
            raise InputError(f"{args.model}: {error}") from None
        write_predictions(out, out_path)
        errors = group_errors(out) if args.exact else None
        if errors is not None:
            for (n, k, m), rate in rates.items():
                errors[f"n{n}_k{k}_m{m}"]["codes_per_second"] = rate
            from labpipe.files import write_json

            write_json(out_path.with_suffix(".json"), {"model": args.model, "input": args.input or "random",
                                                       "groups": errors})
    except UserError as error:
        print(f"labpipe mheight-predict: error: {error}", file=sys.stderr)
        return error.exit_code
    except OSError as error:  # an output that cannot be written: one line naming it, as the CLI does
        if error.filename is None:
            raise
        print(f"labpipe mheight-predict: error: {error.filename}: {error.strerror}", file=sys.stderr)
        return 1
    sizes = out.groupby(GROUP).size()
    for (n, k, m), rate in rates.items():
        rows = errors[f"n{n}_k{k}_m{m}"] if errors else {"rows": int(sizes[n, k, m])}
        print(f"n={n} k={k} m={m}: {describe(rows)}, network {rate:,.0f} codes/s")
    if errors:
        print(f"all: {describe(errors['all'])}")
    print(f"wrote {out_path} ({len(out)} rows)" + (f" and {out_path.with_suffix('.json')}" if errors else ""))
    return 0


def describe(summary: dict) -> str:
    """One group's figures (group_errors, or only its rows) for a line of output."""
    text = f"{summary['rows']} rows"
    if summary.get("log2_mse") is not None:
        text += f", log2-MSE {summary['log2_mse']:.4g}, {summary['below_exact']:.1%} below exact"
    if summary.get("infinite"):
        text += f", {summary['infinite']} infinite (left out of the errors)"
    return text
