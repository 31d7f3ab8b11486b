"""What the experiment scripts share: a number as a table cell, a finished run appended to ``runs.jsonl`` as it
ends (a long sweep that stops keeps what it measured), and the final Markdown table written and printed.

The scripts are run as ``python experiments/<name>.py``, so Python puts ``experiments/`` first on ``sys.path`` and
they import this module as ``from _tables import ...``.
"""
from __future__ import annotations

import json
from pathlib import Path


def fmt(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def recorded(out: Path) -> list[dict]:
    """The rows ``<out>/runs.jsonl`` holds so far (none when it does not exist): a rerun's starting ``rows``."""
    log = out / "runs.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []


def record(out: Path, rows: list[dict], row: dict) -> None:
    """``row`` appended to ``rows`` and, at once, to ``<out>/runs.jsonl``."""
    rows.append(row)
    with open(out / "runs.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def finish(out: Path, text: str) -> None:
    """The table into ``<out>/table.md``, and on stdout."""
    (out / "table.md").write_text(text + "\n")
    print(text)
