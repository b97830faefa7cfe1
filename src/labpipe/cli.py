"""labpipe <verb> [--params params.yaml] [--set section.key=value ...]: one verb per pipeline stage.

DVC stages call these verbs; so can a person, with overrides that are checked like params.yaml.
"""

from __future__ import annotations

import argparse
import importlib
import json
import signal
import sys
import threading

from labpipe import registry
from labpipe.config import Params, apply_override, build, flatten, load_params, parse_yaml
from labpipe.errors import Terminated, UserError

# verb -> (module:function, what it does), from the registry of research lines; imported only when it runs.
STAGES = {stage.verb: (stage.entry, stage.help) for stage in registry.STAGES.values()}
STAGES["synth-verify"] = ("labpipe.synth.generate:run_verify", "check every shard of the manifest against its sha256")

# verb -> (module:function, what it does): tools with their own flags; the function takes argv, returns the exit code.
TOOLS = {
    "dormancy-plot": ("labpipe.dormancy.plots:main", "the three dormancy plots and summary statistics from a CSV"),
    "doctor": ("labpipe.doctor:main", "check torch/CUDA, MLflow, DVC and disk; non-zero when a requirement fails"),
    "jobs": ("labpipe.cluster.jobs:main", "submit, list, show, modify and cancel jobs (local DVC queue or Slurm)"),
    "accelerators": ("labpipe.cluster.accelerators:main", "GPUs here, or per node of the Slurm cluster"),
    "checkpoints": ("labpipe.checkpoint:main", "each training stage's checkpoints; --prune deletes those moved aside"),
    "mheight-predict": ("labpipe.grok.predict:main",
                        "m-heights of codes from the trained regressor; --exact: against the exact heights"),
    "report": ("labpipe.report.main:main",
               "a line's runs compared (grok, hmm, lm, crosscoder, dormancy): reports/<line>/report.{md,html}"),
    "hmm-sample": ("labpipe.hmm.sample:main",
                   "sentences sampled from a saved HMM, each state's top words, next words after a --prompt"),
    "lm-sample": ("labpipe.lm.sample:main", "sequences sampled from a saved LM, as the HMM's words where they apply"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in TOOLS:  # a tool parses its own flags (argparse.REMAINDER refuses a leading --flag)
        module, function = TOOLS[argv[0]][0].split(":")
        return getattr(importlib.import_module(module), function)(argv[1:])
    parser = argparse.ArgumentParser(prog="labpipe", description=__doc__.splitlines()[0])
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="verb")
    for verb, (_target, help_text) in STAGES.items():
        _add_params_args(verbs.add_parser(verb, help=help_text))
    _add_dormancy_flags(verbs.choices["dormancy"])
    verbs.choices["hmm-eval"].add_argument(
        "--model", help="evaluate this HMM instead of hmm_train's: a model.pt, a checkpoint or an MLflow URI "
                        "(models:/hmm-K100@champion); outputs in artifacts/hmm/eval-<model>/")
    for verb, (_target, help_text) in TOOLS.items():
        verbs.add_parser(verb, help=help_text)  # listed in --help; main() hands their arguments over above
    show = verbs.add_parser("params", help="print the resolved params (after --set) as JSON")
    _add_params_args(show)
    profile = verbs.add_parser("profile", help="turn a profile (a partial params file) into DVC -S flags")
    profile.add_argument("profile_file")
    profile.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)

    previous = signal.signal(signal.SIGTERM, _terminate) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        if args.verb == "dormancy":
            args.set = _dormancy_overrides(args) + args.set
        if args.verb == "profile":
            print(" ".join(profile_flags(args.params, args.profile_file)))
            return 0
        params = load_params(args.params, args.set)
        if args.verb == "params":
            print(json.dumps(flatten(params), indent=2))
            return 0
        if (ranks := _ranks_to_start(args.verb, params)) > 1:
            from labpipe import distributed

            return distributed.launch(argv, ranks, f"labpipe {args.verb}")
        module, function = STAGES[args.verb][0].split(":")
        options = {"model": args.model} if args.verb == "hmm-eval" and args.model else {}
        getattr(importlib.import_module(module), function)(params, **options)
    except UserError as error:  # the user's mistake: one line; anything else is a bug and keeps its traceback
        print(f"labpipe {args.verb}: error: {error}", file=sys.stderr)
        return error.exit_code
    except OSError as error:
        if error.filename is None:
            raise
        print(f"labpipe {args.verb}: error: {error.filename}: {error.strerror}", file=sys.stderr)
        return 1
    except Terminated:
        print(f"labpipe {args.verb}: terminated (SIGTERM): outputs left as they were", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print(f"labpipe {args.verb}: interrupted (Ctrl-C): outputs left as they were", file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


def _ranks_to_start(verb: str, params: Params) -> int:
    """The ranks `<section>.devices` asks for, for a data-parallel stage (distributed.py), unless a launcher
    (torchrun, Slurm) started this process as one of them."""
    try:
        training = registry.stage(verb).training
    except KeyError:  # a verb that is no stage: synth-verify
        return 1
    if training is None or not training.data_parallel:
        return 1
    section = getattr(params, training.section)
    from labpipe import distributed
    from labpipe.device import resolve_device

    if distributed.launched():
        return 1
    return distributed.ranks_to_start(section.devices, resolve_device(section.device, f"{training.section}.device"))


def _terminate(signum, frame) -> None:
    raise Terminated()


def _add_params_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one param, e.g. --set grok.weight_decay=0.03 (repeatable)")


def _add_dormancy_flags(parser: argparse.ArgumentParser) -> None:
    """The seed's knobs as flags; each is a shorthand for --set dormancy.<key>=..., checked the same way."""
    parser.add_argument("--profile", help="a partial params file applied over --params first, e.g. "
                                          "params.pythia.yaml (the lab's Pythia analysis)")
    parser.add_argument("--model", help="Hugging Face name or local directory")
    parser.add_argument("--revisions", help="comma-separated, e.g. step1000,step14000")
    parser.add_argument("--layers", help="comma-separated decoder layers, e.g. 0,3 (default: every layer)")
    parser.add_argument("--samples", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--thresholds", help="comma-separated, e.g. 0,0.025,0.1")
    parser.add_argument("--device")
    parser.add_argument("--output", help="the CSV to append to")
    parser.add_argument("--quick", action="store_true",
                        help="the first 2 revisions, 100 samples, into quick/test_<name> beside the CSV")


def _dormancy_overrides(args: argparse.Namespace) -> list[str]:
    """The profile's keys, then --quick's, then the flags': a later one wins, and --set after them all."""
    from pathlib import Path

    from labpipe.config import ConfigError
    from labpipe.inputs import read_text

    def as_list(text: str, quote: bool) -> str:
        items = [item.strip() for item in text.split(",") if item.strip()]
        return json.dumps(items) if quote else "[" + ",".join(items) + "]"  # unquoted: YAML numbers

    overrides = []
    if args.profile:
        profile = parse_yaml(read_text(args.profile), where=args.profile) or {}
        if not isinstance(profile, dict):
            raise ConfigError(f"{args.profile}: a profile is a mapping of sections to keys, like params.yaml")
        overrides = [f"{key}={json.dumps(value)}" for key, value in _leaves(profile)]
    if args.quick:  # the seed's quick test: a CSV of its own, never mixed into the full analysis' rows
        csv = Path(load_params(args.params, overrides).dormancy.output_csv)
        overrides += ["dormancy.max_revisions=2", "dormancy.samples=100",
                      f"dormancy.output_csv={json.dumps(str(csv.parent / 'quick' / f'test_{csv.name}'))}"]
    for flag, key, value in (("model", "model", args.model), ("revisions", "revisions", args.revisions),
                             ("layers", "layers", args.layers), ("samples", "samples", args.samples),
                             ("batch_size", "batch_size", args.batch_size),
                             ("thresholds", "thresholds", args.thresholds), ("device", "device", args.device),
                             ("output", "output_csv", args.output)):
        if value is None:
            continue
        if flag in ("revisions", "layers", "thresholds"):
            value = as_list(value, quote=flag == "revisions")
        elif flag in ("model", "device", "output"):
            value = json.dumps(value)  # a quoted YAML string: a name like "off" or "1e3" stays a string
        overrides.append(f"dormancy.{key}={value}")
    return overrides


def profile_flags(params_path: str, profile_path: str) -> list[str]:
    """`-S key=value` for every key of the profile, each checked against the schema and params.yaml."""
    with open(profile_path) as f:
        profile = parse_yaml(f.read(), where=profile_path) or {}
    # Compact JSON (valid YAML, no spaces): the flags survive the shell's word splitting in `$(...)`.
    overrides = [f"{key}={json.dumps(value, separators=(',', ':'))}" for key, value in _leaves(profile)]
    with open(params_path) as f:
        raw = parse_yaml(f.read(), where=params_path)
    for override in overrides:
        apply_override(raw, override)
    build(Params, raw, where=f"{params_path} + {profile_path}")
    return [f"-S {override}" for override in overrides]


def _leaves(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


if __name__ == "__main__":
    sys.exit(main())
