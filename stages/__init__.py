"""The pipeline's stages, run as ``python -m stages.X`` (dvc.yaml).

Python imports this package before the stage module, so this runs before anything heavy: stop
signals are held until the stage's handlers are in place (slimcore_pipeline.process.start_up_done), and
the stage is tied to the life of the process that started it (``dvc repro``).
"""

import importlib.util
import sys

# A stage run by a python without the project's packages (the system python, with `.venv` not
# activated) says what to do instead of failing deep in an import.
_MISSING = [name for name in ("typer", "rich", "yaml", "pydantic", "torch") if importlib.util.find_spec(name) is None]
if _MISSING:
    sys.stderr.write(f"error: {sys.executable} has no {', '.join(_MISSING)}: run `source .venv/bin/activate` "
                     "first (or `make repro`, which uses .venv)\n")
    raise SystemExit(2)

from slimcore_pipeline.process import enter_stage_process  # noqa: E402

enter_stage_process()
