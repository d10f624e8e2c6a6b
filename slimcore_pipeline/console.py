"""The one rich console all progress and log lines go to (stderr, so stdout stays clean).

Under ``dvc repro`` stderr is a pipe: rich would wrap at 80 columns and pad every log line with
spaces to the console's width. There, lines are written whole and unpadded (``soft_wrap``), and
``log`` is ``[HH:MM:SS] message`` on one line; on a terminal rich's own layout is kept.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from rich.console import Console


class _Console(Console):
    def log(self, *objects: Any, sep: str = " ", end: str = "\n", style: Any = None, justify: Any = None,
            emoji: bool | None = None, markup: bool | None = None, highlight: bool | None = None,
            log_locals: bool = False, _stack_offset: int = 1) -> None:
        if self.is_terminal:
            super().log(*objects, sep=sep, end=end, style=style, justify=justify, emoji=emoji, markup=markup,
                        highlight=highlight, log_locals=log_locals, _stack_offset=_stack_offset + 1)
            return
        stamp = datetime.now().strftime("[%X]")
        self.print(stamp, *objects, sep=sep, end=end, style=style, emoji=emoji, markup=markup, highlight=highlight,
                   soft_wrap=True)


def _make_console() -> Console:
    probe = Console(stderr=True)
    if probe.is_terminal:
        return _Console(stderr=True, log_path=False)
    return _Console(stderr=True, log_path=False, soft_wrap=True, width=160)


console = _make_console()
