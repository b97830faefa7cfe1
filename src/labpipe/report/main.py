"""labpipe report <line>: the runs of a research line compared, as a report with a scientific structure.

    labpipe report grok|hmm|lm|crosscoder|dormancy [--runs ID,...] [--experiment NAME] [--dvc-exp NAME]
                   [--tag KEY=VALUE] [--out DIR]

writes DIR (default reports/<line>/): report.md with its figures (PNG) and tables (CSV) beside it, and
report.html, the same self-contained; then logs it to MLflow as a run tagged labpipe.report=<line>.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from labpipe import registry
from labpipe.errors import InputError, UserError
from labpipe.files import atomic_dir
from labpipe.report import runs as read
from labpipe.report import sections
from labpipe.report.document import Bullets, Report, write
from labpipe.report.log import log_report
from labpipe.report.select import Selection, parse_tag, select

# line -> its builder: a module with STAGES (the stages whose runs it reads), TITLE, SWEEP (the make target of
# the line's sweep and its variable per param, or None) and build(runs, labels, keys, out) -> Findings
LINES = {"grok": "labpipe.report.grok", "hmm": "labpipe.report.hmm", "lm": "labpipe.report.lm",
         "crosscoder": "labpipe.report.crosscoder", "dormancy": "labpipe.report.dormancy"}
REPORT = "report.md"


class Parser(argparse.ArgumentParser):
    """argparse whose mistakes are the tool's one-line errors (exit 2), not a usage block."""

    def error(self, message: str):
        raise InputError(message)


def report_dir(line: str) -> Path:
    """Where `labpipe report <line>` writes by default: reports/<line>/ (report.md, report.html, ...)."""
    return Path("reports") / line


def main(argv: list[str]) -> int:
    parser = Parser(prog="labpipe report", description=__doc__.splitlines()[0])
    parser.add_argument("line", help=f"one of {', '.join(LINES)}")
    parser.add_argument("--runs", default="", metavar="ID,...", help="these runs instead of searching")
    parser.add_argument("--experiment", metavar="NAME", help="the MLflow experiment to search (default: the line's)")
    parser.add_argument("--dvc-exp", action="append", default=[], metavar="NAME",
                        help="only runs of this DVC experiment (tag dvc.exp_name); repeatable")
    parser.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE",
                        help="only runs with this tag, e.g. labpipe.job_id=3f2a; repeatable")
    parser.add_argument("--out", metavar="DIR", help="the report folder (default: reports/<line>/)")
    try:
        args = parser.parse_args(argv)
        if args.line not in LINES:
            raise InputError(f"unknown line {args.line!r}: one of {', '.join(LINES)}")
        selection = Selection(tuple(filter(None, (i.strip() for i in args.runs.split(",")))), args.experiment,
                              tuple(args.dvc_exp), tuple(parse_tag(tag) for tag in args.tag))
        out = Path(args.out) if args.out else report_dir(args.line)
        run_id = make_report(args.line, selection, out)
    except UserError as error:
        print(f"labpipe report: error: {error}", file=sys.stderr)
        return error.exit_code
    except OSError as error:  # a folder it may not write, a full disk: named, as the stages do
        if error.filename is None:
            raise
        print(f"labpipe report: error: {error.filename}: {error.strerror}", file=sys.stderr)
        return 1
    print(f"wrote {out / REPORT} and {out / 'report.html'}; MLflow run {run_id}")
    return 0


def make_report(line: str, selection: Selection, out: Path) -> str:
    """Select the runs, build and write the report into `out` (replaced whole), log it; returns its run id."""
    from labpipe.tracking import tracking_uri

    builder = importlib.import_module(LINES[line])
    experiment = selection.experiment or registry.line_of(builder.STAGES[0]).experiment
    runs = select(builder.STAGES, experiment, selection)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / REPORT).exists())):
        raise InputError(f"--out {out}: exists and holds no report; name a new folder or an old report's")
    keys = read.differing(runs)
    labels = read.labels(runs, keys)
    with atomic_dir(out) as staging:
        findings = builder.build(runs, labels, keys, staging)
        summary = (f"{len(runs)} runs of {', '.join(builder.STAGES)} ({selection.describe()}). "
                   + " ".join(findings.headline))
        write(Report(f"{builder.TITLE}: {len(runs)} runs compared", {
            "Summary": [summary],
            "Setup": sections.setup(runs, labels, keys, experiment, tracking_uri()),
            "Results": findings.results,
            "Observations": [Bullets(findings.observations)],
            "How to reproduce": sections.reproduce(line, runs, keys, builder.SWEEP),
        }), staging)
    return log_report(experiment, line, out, runs, summary)
