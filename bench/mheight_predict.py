"""m-height prediction: the regressor's codes/s and log2 errors, next to the exact solver and the LP.

    python bench/mheight_predict.py [--model PATH-or-URI] [--codes 2000] [--lp-codes 2] [--n 9 10] [--k 4 5 6]
                                    [--device cpu] [--batch 65536] [--seed 0] [--train-steps 300]

The same random codes [I | P], P integer in [-100, 100] (labpipe.grok.predict.random_codes), go through
the three: the network (batch inference on --device; encoding the codes is not timed), labpipe's exact
solver (m_heights_batch, which yields the whole profile h_0..h_(n-1) of a code in one pass) and the LP
(tests/reference.lp_m_height, h_m alone, on --lp-codes codes only: it is slow). Groups are the lab's,
every (n, k, m) with m from 2 to n - k. The network's log2-MSE is against the exact heights, infinite
ones (m >= d) left out. Without --model a small ResNet is first trained here on codes generated as stage
mheight_data generates them: its errors show the path works, not what the champion reaches.
"""

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO / "tests")]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from labpipe.device import resolve_device  # noqa: E402
from labpipe.errors import InputError  # noqa: E402
from labpipe.grok.features import features  # noqa: E402
from labpipe.grok.predict import exact_heights, infer_log2, load_regressor, random_codes  # noqa: E402
from reference import lp_m_height  # noqa: E402


def timed(function, *args, **kwargs):
    """(result, seconds) of one call."""
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def train_small_model(ns: list[int], ks: list[int], codes_per_group: int, steps: int, device: torch.device):
    """A ResNet (params.yaml's grok section) fitted by `steps` Adam steps of 512 rows on mheight_data's
    generated codes: the stage's generation, encoding, model and loss, at a size that takes seconds."""
    from labpipe.config import load_params
    from labpipe.grok.features import encode, make_layout
    from labpipe.grok.models import build_model, log2_loss
    from labpipe.mheight.data import generate

    params = load_params(REPO / "params.yaml", [
        f"mheight.n={json.dumps(ns)}", f"mheight.k={json.dumps(ks)}", "mheight.m_min=2", "mheight.workers=1",
        f"mheight.samples_per_group={codes_per_group}", "mheight.device=cpu", "grok.model=resnet"])
    frame = generate(params.mheight)
    layout = make_layout(frame)
    train = encode(frame, layout)
    torch.manual_seed(params.grok.seed)
    model = build_model(params.grok, layout).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, log2_h = train.x.to(device), train.log2_h.to(device)
    generator = torch.Generator().manual_seed(params.grok.seed)
    for _ in range(steps):
        rows = torch.randint(len(log2_h), (512,), generator=generator).to(device)
        loss = log2_loss(model(x[rows])[0], log2_h[rows], model.output_head).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.cpu().eval(), len(log2_h)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a grok_train model.pt or an MLflow model URI (default: train one here)")
    parser.add_argument("--codes", type=int, default=2000, help="random codes per group")
    parser.add_argument("--lp-codes", type=int, default=2, help="of those, how many also go through the LP")
    parser.add_argument("--n", type=int, nargs="+", default=[9, 10])
    parser.add_argument("--k", type=int, nargs="+", default=[4, 5, 6])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto: the network's and the exact "
                        "solver's")
    parser.add_argument("--batch", type=int, default=65536, help="codes per forward pass")
    parser.add_argument("--seed", type=int, default=0, help="of the benchmark's codes")
    parser.add_argument("--train-steps", type=int, default=300, help="without --model: Adam steps")
    parser.add_argument("--train-codes", type=int, default=256, help="without --model: generated codes per group")
    args = parser.parse_args()
    if args.lp_codes < 1 or args.codes < args.lp_codes:
        parser.error("need 1 <= --lp-codes <= --codes")
    try:
        run(args)
    except InputError as error:  # a group the model was not trained on, a model that cannot be loaded
        raise SystemExit(f"{parser.prog}: error: {error}") from None


def run(args: argparse.Namespace) -> None:
    device = resolve_device(args.device, "--device")
    groups = [(n, k, m) for n in args.n for k in args.k for m in range(2, n - k + 1)]
    if args.model:
        model, source = load_regressor(args.model), args.model
    else:
        (model, rows), seconds = timed(train_small_model, args.n, args.k, args.train_codes, args.train_steps,
                                       device)
        source = (f"no --model: a small ResNet trained here ({args.train_steps} Adam steps on {rows} generated "
                  f"codes, {seconds:.0f} s), not the champion")
    print(f"model: {source}", flush=True)
    print(f"device={device} codes={args.codes}/group lp_codes={args.lp_codes}/group threads={torch.get_num_threads()}")
    print(f"{'group':<10} {'network':>12} {'exact':>12} {'LP':>10} {'net/exact':>10} {'net/LP':>10} "
          f"{'log2-MSE':>9} {'below':>6} {'inf':>4}   (codes/s; below: predictions under the exact height)")
    seconds = np.zeros(3)  # network, exact, LP
    errors = []
    for n, k, m in groups:
        frame = random_codes(args.codes, n, k, m, args.seed)
        x = features(frame, model.layout)[0]
        infer_log2(model, x, device, args.batch)  # warm-up: CUDA context, kernels, allocations of this size
        log2_hat, network_seconds = timed(infer_log2, model, x, device, args.batch)
        exact_heights(frame.iloc[:8], device)  # warm-up: the solver's tables
        heights, exact_seconds = timed(exact_heights, frame, device)
        lp, lp_seconds = timed(lp_heights, frame.iloc[: args.lp_codes])
        if not np.allclose(lp, heights[: args.lp_codes], rtol=1e-6):
            raise SystemExit(f"n={n} k={k} m={m}: the LP {lp} and the exact solver {heights[: args.lp_codes]} disagree")
        group_seconds = np.array([network_seconds, exact_seconds, lp_seconds])
        seconds += group_seconds
        error = log2_hat - np.log2(heights)  # -inf where the height is infinite
        errors.append(error)
        print(line(f"n{n} k{k} m{m}", [args.codes, args.codes, args.lp_codes] / group_seconds, error), flush=True)
    codes = len(groups) * np.array([args.codes, args.codes, args.lp_codes])
    print(line("all", codes / seconds, np.concatenate(errors)))


def lp_heights(frame) -> np.ndarray:
    return np.array([lp_m_height(np.hstack([np.eye(k), np.reshape(P, (k, n - k))]), m)
                     for n, k, m, P in zip(frame.n, frame.k, frame.m, frame.P, strict=True)])


def line(label: str, rates: np.ndarray, error: np.ndarray) -> str:
    """A row of the table: codes/s of the three, the network's ratios, its errors over the finite heights."""
    network, exact, lp = rates
    finite = error[np.isfinite(error)]
    return (f"{label:<10} {network:>12,.0f} {exact:>12,.0f} {lp:>10,.2f} {network / exact:>9,.0f}x "
            f"{network / lp:>9,.0f}x {np.mean(finite ** 2):>9.3f} {np.mean(finite < 0):>6.1%} "
            f"{len(error) - len(finite):>4}")


if __name__ == "__main__":
    main()
