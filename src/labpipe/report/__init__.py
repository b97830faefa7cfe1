"""`labpipe report <line>`: a research line's MLflow runs compared, as a report with the structure of a paper
(summary, setup, results, observations, how to reproduce), read top to bottom in this order:

    main.py       the command: its flags, the lines, the steps below in order
    select.py     which runs: the selection flags applied to the store; training runs paired with evaluations
    runs.py       what a run says: params as they stand, labels, metric histories, data versions
    grok.py hmm.py lm.py crosscoder.py dormancy.py
                  one builder per line: its figures (with their data), tables and observations
    sections.py   the setup and reproduction sections every line shares
    document.py   the report's blocks, written as report.md and a self-contained report.html
    log.py        the report as an MLflow run of its own (tag labpipe.report=<line>)

The report of line L is reports/L/report.md and reports/L/report.html (main.report_dir), its PNG figures and
CSV tables beside them.
"""
