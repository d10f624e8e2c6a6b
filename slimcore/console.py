"""The one rich console all progress and log lines go to (stderr, so stdout stays clean)."""

from __future__ import annotations

from rich.console import Console


def _make_console() -> Console:
    probe = Console(stderr=True)
    # Under `dvc repro` stderr is a pipe: rich would wrap at 80 columns; keep lines whole.
    return Console(stderr=True, log_path=False, width=None if probe.is_terminal else 160)


console = _make_console()
