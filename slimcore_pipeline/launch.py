"""``torchrun`` for the training stages: ``python -m slimcore_pipeline.launch`` takes torchrun's arguments.

torchrun's agent turns a SIGINT or SIGTERM into a ``SignalException`` that ends in a traceback
and exit 1, after its workers have already printed the stage's one-line interrupt message and
exited 130. This launcher ends the same way the workers do: exit 130, no traceback.
"""

from __future__ import annotations

import sys

EXIT_INTERRUPTED = 130


def main(argv: list[str] | None = None) -> int:
    """Run torchrun with ``argv`` (default: this process's arguments); 130 when it was stopped."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun

    try:
        torchrun(argv)
    except (SignalException, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
