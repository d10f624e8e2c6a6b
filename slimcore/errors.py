"""The errors users meet: each names what is wrong and what was expected.

Stages turn any :class:`SlimcoreError` into one line and a non-zero exit code, without a
traceback, before any artifact is written.  Kept in a module of its own (no torch) so that
catching them never imports the heavy modules that raise them.
"""

from __future__ import annotations


class SlimcoreError(ValueError):
    """Base class of the errors a user can fix by changing input, params or files.

    Example:
        >>> try:
        ...     slimcore.load_model("someone-elses.pt")
        ... except slimcore.SlimcoreError as err:   # one line that says what to change
        ...     print(err)
    """


class ParamsError(SlimcoreError):
    """params.yaml (or a stage option) is invalid; the message names the key."""


class DataError(SlimcoreError):
    """A dataset root is missing, has the wrong layout or disagrees with a checkpoint."""


class CheckpointError(SlimcoreError):
    """A checkpoint is missing, truncated, foreign or disagrees with what was asked for."""


class ModelError(SlimcoreError):
    """A model cannot be built from its source (unknown name, missing package, bad factory)
    or given weights do not fit it.

    Example:
        >>> slimcore.build_model("resnet5O", num_classes=10)   # ModelError: ... did you mean resnet50?
    """


__all__ = ["CheckpointError", "DataError", "ModelError", "ParamsError", "SlimcoreError"]
