"""``python -m slimcore.export ARGS`` run in-process: its exit status and what it printed."""

from __future__ import annotations

import contextlib
import io
from types import SimpleNamespace

from slimcore.export import main


def export_cli(args: list[str]) -> SimpleNamespace:
    """``exit_code`` and ``output`` (stdout and stderr together) of the export CLI on ``args``."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            code = main(args)
        except SystemExit as stop:  # argparse refusing an option
            code = stop.code
    return SimpleNamespace(exit_code=code, output=out.getvalue())
