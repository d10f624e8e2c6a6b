"""The pipeline's stages, run as ``python -m stages.X`` (dvc.yaml).

Python imports this package before the stage module, so this runs before anything heavy: stop
signals are held until the stage's handlers are in place (slimcore.process.start_up_done), and
the stage is tied to the life of the process that started it (``dvc repro``).
"""

from slimcore.process import enter_stage_process

enter_stage_process()
