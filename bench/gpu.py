"""The GPU benches of `make test-gpu`, each with its CPU (or peer) figure from the same run, in one JSON and one
markdown file.

    python bench/gpu.py [--out DIR] [--quick] [--cpu-only] [--only grok,mheight,hmm,lm]

  grok     grok_train's epoch (bench/grok_epoch.py): 105,000 rows, batch 4096, ResNet 64 x 5; CUDA (device-resident
           and the seed's DataLoader loop) vs the CPU, and vs the seed's RTX 3050 (19 s/epoch)
  hmm      one EM epoch's tokens/s (bench/hmm_em.py) at H=500, K=200, L=100, batch 256: the torch backend on CUDA
           vs on the CPU (same sequences: the log-likelihoods must agree), and pomegranate's DenseHMM (the seed's)
           on CUDA at the largest batch that fits its memory budget
  lm       lm_train's step (bench/lm_ddp.py, one process) on params.full.yaml's ~113M-parameter Llama, 64 x 256
           tokens: CUDA bf16 autocast eager and torch.compile'd, the CPU (fp32, 4 rows a step); tokens/s and model
           FLOPs utilisation, 6 N + 12 L d T FLOPs a token (N the parameters but the embedding), against the
           datasheet's dense bf16 peak and against a bf16 matrix product measured in the same run
  mheight  exact m-heights (labpipe.mheight.m_heights_batch) of random (10,5) codes, P in [-100, 100]: codes/s
           on CUDA vs the CPU, and the largest relative difference between the two on the same codes

Where no CUDA device is present (or with --cpu-only) only the CPU figures are taken. --quick shrinks every size
to a smoke run of seconds (the CPU path that tests/test_gpu.py checks). Results: DIR, else $OUT (what the device
tool brings back), else test-results/gpu/: results.json and results.md, both rewritten after each bench (a run
cut short keeps what it measured), the markdown printed at the end. A bench that fails is recorded with its
error and the others still run; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO / "bench")]

import numpy as np  # noqa: E402
import torch  # noqa: E402

import grok_epoch  # noqa: E402
import hmm_em  # noqa: E402
import lm_ddp  # noqa: E402
import mheight_exact  # noqa: E402
from labpipe.cli import profile_flags  # noqa: E402
from labpipe.config import load_params  # noqa: E402
from labpipe.hmm import estimate_memory_bytes  # noqa: E402
from labpipe.lm.train import build_model  # noqa: E402
from labpipe.mheight import m_heights_batch  # noqa: E402

BENCHES = ("grok", "mheight", "hmm", "lm")  # the longest (torch.compile) last
SEED_RTX3050_S_PER_EPOCH = 19.0  # the seed's grok epoch at full scale on its RTX 3050
GB = 1e9

# Dense bf16 matrix peak by the vendor's datasheet (FLOP/s), by a fragment of the device's name.
DATASHEET_BF16 = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12))

SIZES = {
    "full": {
        "grok": {"rows": 105_000, "batch": 4096, "width": 64, "blocks": 5, "cuda_epochs": 5, "cpu_epochs": 2},
        "hmm": {"states": 500, "symbols": 200, "length": 100, "batch": 256, "sequences": 2048,
                "pomegranate_budget_gb": 48.0, "timeout_s": 150},
        "lm": {"profile": "params.full.yaml", "sets": [], "cuda_steps": 20, "cpu_rows": 4, "cpu_steps": 2},
        "mheight": {"n": 10, "k": 5, "cuda_codes": 20_000, "cuda_chunk": 4096, "cpu_codes": 2000},
    },
    "quick": {
        "grok": {"rows": 2048, "batch": 256, "width": 16, "blocks": 1, "cuda_epochs": 1, "cpu_epochs": 1},
        "hmm": {"states": 20, "symbols": 20, "length": 20, "batch": 16, "sequences": 64,
                "pomegranate_budget_gb": 1.0, "timeout_s": 60},
        "lm": {"profile": None, "sets": ["lm.hidden_size=16", "lm.layers=1", "lm.heads=2", "lm.intermediate_size=32",
                                          "lm.batch_size=4", "synth.seq_length=16"],
               "cuda_steps": 2, "cpu_rows": 4, "cpu_steps": 2},
        "mheight": {"n": 10, "k": 5, "cuda_codes": 64, "cuda_chunk": 64, "cpu_codes": 32},
    },
}


def row(label: str, device: str, value: float, unit: str, **detail) -> dict:
    return {"label": label, "device": device, "value": value, "unit": unit, **detail}


def ratio(label: str, value: float) -> dict:
    return {"label": label, "value": value}


# ----------------------------------------------------------------------------- the benches


def bench_grok(size: dict, cuda: bool) -> dict:
    config = {k: size[k] for k in ("rows", "batch", "width", "blocks")}
    rows, ratios = [], []
    if cuda:
        r = grok_epoch.measure(device="cuda", epochs=size["cuda_epochs"], **config)
        rows.append(row("grok_train epoch (device-resident)", "cuda", r["epochs_per_s"], "epochs/s",
                        s_per_epoch=1 / r["epochs_per_s"]))
        rows.append(row("DataLoader loop (the seed's)", "cuda", r["dataloader_epochs_per_s"], "epochs/s",
                        s_per_epoch=1 / r["dataloader_epochs_per_s"]))
    r = grok_epoch.measure(device="cpu", epochs=size["cpu_epochs"], baseline=False, **config)
    rows.append(row("grok_train epoch", "cpu", r["epochs_per_s"], "epochs/s", s_per_epoch=1 / r["epochs_per_s"]))
    if cuda:
        ours, cpu = rows[0]["value"], rows[-1]["value"]
        ratios += [ratio("CUDA / CPU epochs/s", ours / cpu),
                   ratio("device-resident / DataLoader on CUDA", ours / rows[1]["value"]),
                   ratio(f"vs the seed's RTX 3050 ({SEED_RTX3050_S_PER_EPOCH:g} s/epoch)",
                         SEED_RTX3050_S_PER_EPOCH * ours)]
    return {"config": config, "rows": rows, "ratios": ratios}


def bench_hmm(size: dict, cuda: bool) -> dict:
    h, e, batch = size["states"], size["symbols"], size["batch"]
    config = {k: size[k] for k in ("states", "symbols", "length", "batch", "sequences")}
    rows, ratios, runs = [], [], {}

    def run(backend: str, device: str, batch: int) -> dict:
        args = SimpleNamespace(length=size["length"], sequences=size["sequences"], device=device)
        return hmm_em.run_worker(backend, h, e, batch, args, timeout=size["timeout_s"])

    for device in (["cuda"] if cuda else []) + ["cpu"]:
        runs[device] = run("torch", device, batch)
        rows.append(row("torch backend, one EM epoch", device, runs[device]["tokens_per_s"], "tokens/s",
                        batch=batch, seconds=runs[device]["seconds"], peak_bytes=runs[device]["peak_bytes"],
                        log_likelihood=runs[device]["log_likelihood"]))
    if cuda:
        budget = size["pomegranate_budget_gb"] * GB
        seed_batch = hmm_em.largest_batch_that_fits(h, e, batch, size["length"], budget)
        try:
            seed = run("pomegranate", "cuda", seed_batch)
            rows.append(row("pomegranate DenseHMM (the seed's), one EM epoch", "cuda", seed["tokens_per_s"],
                            "tokens/s", batch=seed_batch, seconds=seed["seconds"], peak_bytes=seed["peak_bytes"],
                            estimate_bytes=estimate_memory_bytes("pomegranate", h, e, seed_batch, size["length"]),
                            log_likelihood=seed["log_likelihood"]))
            ratios.append(ratio("torch / pomegranate tokens/s on CUDA", runs["cuda"]["tokens_per_s"] /
                                seed["tokens_per_s"]))
        except (subprocess.SubprocessError, ValueError) as error:  # the peer only: the torch figures stand
            rows.append(row("pomegranate DenseHMM (the seed's), one EM epoch", "cuda", None, "tokens/s",
                            batch=seed_batch, error=failure(error)))
        ratios.append(ratio("CUDA / CPU tokens/s (torch backend)",
                            runs["cuda"]["tokens_per_s"] / runs["cpu"]["tokens_per_s"]))
        cpu_ll = runs["cpu"]["log_likelihood"]
        ratios.append(ratio("|log-likelihood CUDA - CPU| / |CPU|", abs(runs["cuda"]["log_likelihood"] - cpu_ll) /
                            abs(cpu_ll)))
    return {"config": config, "rows": rows, "ratios": ratios}


def lm_sets(size: dict) -> list[str]:
    """The LM's params: the profile's lm.* keys and synth.seq_length (its row length), then the size's sets."""
    sets = []
    if size["profile"]:
        flags = profile_flags(str(REPO / "params.yaml"), str(REPO / size["profile"]))
        sets = [flag.removeprefix("-S ") for flag in flags]
        sets = [s for s in sets if s.startswith("lm.") or s.startswith("synth.seq_length=")]
    return sets + size["sets"]


def flops_per_token(sets: list[str]) -> tuple[float, int]:
    """Training FLOPs a token (6 N + 12 L d T: the matrix products forward and backward, N the parameters but
    the embedding's, and attention's scores and values) and the parameter count."""
    params = load_params(REPO / "params.yaml", sets)
    lm, length = params.lm, params.synth.seq_length
    model = build_model(lm, lm_ddp.VOCAB)
    parameters = sum(p.numel() for p in model.parameters())
    dense = parameters - model.get_input_embeddings().weight.numel()
    return 6 * dense + 12 * lm.layers * lm.hidden_size * length, parameters


def bf16_matmul_flops(device: str, n: int = 8192, repeats: int = 10) -> float:
    """FLOP/s of an n x n x n bf16 matrix product on `device`, the mean of `repeats` after 3 warm-ups."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        a @ b
    stop.record()
    torch.cuda.synchronize(device)
    del a, b
    torch.cuda.empty_cache()
    return 2 * n**3 * repeats / (start.elapsed_time(stop) / 1e3)


def datasheet_bf16(name: str) -> float | None:
    return next((peak for fragment, peak in DATASHEET_BF16 if fragment in name), None)


def bench_lm(size: dict, cuda: bool) -> dict:
    sets = lm_sets(size)
    per_token, parameters = flops_per_token(sets)
    params = load_params(REPO / "params.yaml", sets)
    config = {"parameters": parameters, "layers": params.lm.layers, "hidden_size": params.lm.hidden_size,
              "seq_length": params.synth.seq_length, "step_rows": params.lm.batch_size * params.lm.grad_accum_steps,
              "flops_per_token": per_token, "sets": sets}
    rows, ratios, peaks = [], [], {}
    if cuda:
        name = torch.cuda.get_device_name(0)
        peaks = {"datasheet_bf16_flops": datasheet_bf16(name), "measured_bf16_matmul_flops": bf16_matmul_flops("cuda")}
        config.update(peaks)
        for label, compiled in (("bf16 autocast, eager", False), ("bf16 autocast, torch.compile", True)):
            r = lm_ddp.measure(1, "cuda", sets, size["cuda_steps"], compiled=compiled)
            achieved = r["tokens_per_s"] * per_token
            rows.append(row(f"lm_train step, {label}", "cuda", r["tokens_per_s"], "tokens/s",
                            model_flops=achieved, warmup_s=r["warmup_s"], peak_memory_bytes=r["peak_memory_bytes"],
                            mfu=achieved / peaks["datasheet_bf16_flops"] if peaks["datasheet_bf16_flops"] else None,
                            mfu_of_measured_matmul=achieved / peaks["measured_bf16_matmul_flops"]))
    cpu_sets = sets + [f"lm.batch_size={size['cpu_rows']}", "lm.grad_accum_steps=1"]
    r = lm_ddp.measure(1, "cpu", cpu_sets, size["cpu_steps"], spawn=False)  # no CUDA state to keep apart
    rows.append(row(f"lm_train step, fp32, {size['cpu_rows']} rows a step", "cpu", r["tokens_per_s"], "tokens/s",
                    model_flops=r["tokens_per_s"] * per_token, warmup_s=r["warmup_s"]))
    if cuda:
        eager, compiled, cpu = (r["value"] for r in rows)
        ratios += [ratio("torch.compile / eager tokens/s on CUDA", compiled / eager),
                   ratio("CUDA bf16 eager / CPU fp32 tokens/s", eager / cpu)]
    return {"config": config, "rows": rows, "ratios": ratios}


def bench_mheight(size: dict, cuda: bool) -> dict:
    n, k = size["n"], size["k"]
    config = {k_: size[k_] for k_ in ("n", "k", "cuda_codes", "cuda_chunk", "cpu_codes")}
    codes = mheight_exact.random_codes(n, k, max(size["cuda_codes"] if cuda else 0, size["cpu_codes"]), seed=0)
    rows, ratios = [], []
    m_heights_batch(codes[:8])  # warm-up: tables (and the CPU kernel's compilation)
    cpu, cpu_s = mheight_exact.timed(m_heights_batch, codes[:size["cpu_codes"]])
    rows.append(row(f"exact m-heights, all m, ({n},{k})", "cpu", len(cpu) / cpu_s, "codes/s", codes=len(cpu)))
    if cuda:
        m_heights_batch(codes[:8], device="cuda", chunk=size["cuda_chunk"])  # warm-up: CUDA context, kernels
        on_cuda, cuda_s = mheight_exact.timed(m_heights_batch, codes[:size["cuda_codes"]], device="cuda",
                                              chunk=size["cuda_chunk"])
        rows.insert(0, row(f"exact m-heights, all m, ({n},{k})", "cuda", len(on_cuda) / cuda_s, "codes/s",
                           codes=len(on_cuda), chunk=size["cuda_chunk"]))
        same = on_cuda[:len(cpu)]
        difference = mheight_exact.largest_relative_difference(same, cpu)
        ratios += [ratio("CUDA / CPU codes/s", rows[0]["value"] / rows[1]["value"]),
                   ratio("largest relative difference CUDA vs CPU", difference),
                   ratio("share of heights bit-identical CUDA vs CPU", float(np.mean(same == cpu))),
                   ratio("infinities in the same places (1 = yes)", float(np.array_equal(np.isinf(same),
                                                                                       np.isinf(cpu))))]
    return {"config": config, "rows": rows, "ratios": ratios}


RUNNERS = {"grok": bench_grok, "mheight": bench_mheight, "hmm": bench_hmm, "lm": bench_lm}


# ----------------------------------------------------------------------------- results


def failure(error: BaseException) -> str:
    """The error in a few lines: a subprocess's stderr tail, else the exception and where it came from."""
    stderr = getattr(error, "stderr", None)
    if stderr:
        text = stderr if isinstance(stderr, str) else stderr.decode(errors="replace")
        return f"{type(error).__name__}: {error}\n" + "\n".join(text.strip().splitlines()[-15:])
    return "".join(traceback.format_exception(error)[-6:]).strip()


def host(cuda: bool) -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(0) if cuda else None,
            "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
            "cpu_count": os.cpu_count(), "machine": platform.machine(), "node": platform.node()}


def cell(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:,.3f}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def markdown(results: dict) -> str:
    h = results["host"]
    gpu = f"{h['gpu']} ({h['gpu_memory_gib']} GiB)" if h["gpu"] else "no CUDA device: CPU figures only"
    lines = [f"# labpipe GPU benches{' (--quick)' if results['quick'] else ''}", "",
             f"{results['created']}: {gpu}; torch {h['torch']} (CUDA {h['torch_cuda']}), Python {h['python']}, "
             f"{h['cpu_count']} CPU cores", ""]
    for name, bench in results["benches"].items():
        lines += [f"## {name}", ""]
        if bench["status"] != "ok":
            lines += [f"FAILED after {bench['seconds']:.1f} s:", "", "```", bench["error"], "```", ""]
            continue
        config = ", ".join(f"{k} {cell(v)}" for k, v in bench["config"].items() if k != "sets")
        lines += [f"{config}; {bench['seconds']:.1f} s", "", "| what | device | figure | detail |", "|---|---|---|---|"]
        for r in bench["rows"]:
            detail = ", ".join(f"{k} {cell(v)}" for k, v in r.items() if k not in ("label", "device", "value", "unit"))
            lines.append(f"| {r['label']} | {r['device']} | {cell(r['value'])} {r['unit']} | {detail} |")
        lines += [""] + [f"- {r['label']}: {cell(r['value'])}" for r in bench["ratios"]] + [""]
    return "\n".join(lines)


def finite(value):
    """`value` with every inf or NaN float as the string "inf", "-inf" or "nan": strict JSON."""
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)
    return value


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(finite(results), indent=2, allow_nan=False) + "\n")
    (out / "results.md").write_text(markdown(results) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="results folder (default: $OUT, else test-results/gpu)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of seconds")
    parser.add_argument("--cpu-only", action="store_true", help="the CPU figures alone, even with a GPU")
    parser.add_argument("--only", default=",".join(BENCHES), help=f"comma-separated, of {', '.join(BENCHES)}")
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    if unknown := sorted(set(chosen) - set(BENCHES)):
        parser.error(f"--only: unknown bench(es) {', '.join(unknown)}: choose from {', '.join(BENCHES)}")
    out = Path(args.out or os.environ.get("OUT") or REPO / "test-results" / "gpu")
    cuda = torch.cuda.is_available() and not args.cpu_only
    sizes = SIZES["quick" if args.quick else "full"]
    results = {"schema": 1, "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
               "quick": args.quick, "cuda": cuda, "host": host(cuda), "benches": {}, "failed": []}
    for name in chosen:
        print(f"bench/gpu.py: {name} ...", flush=True)
        started = time.perf_counter()
        try:
            bench = {"status": "ok", **RUNNERS[name](sizes[name], cuda)}
        except Exception as error:  # noqa: BLE001 - recorded, and the other benches still run
            bench = {"status": "failed", "error": failure(error)}
            results["failed"].append(name)
        bench["seconds"] = time.perf_counter() - started
        results["benches"][name] = bench
        write(results, out)
    print(markdown(results))
    print(f"bench/gpu.py: results in {out / 'results.json'} and {out / 'results.md'}"
          + (f"; FAILED: {', '.join(results['failed'])}" if results["failed"] else ""))
    return 1 if results["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
