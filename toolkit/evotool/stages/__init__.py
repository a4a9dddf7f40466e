"""Stage boundaries: the detector (``detect``) and the typed stage file it produces (``file``); the behavioural
ground truth (``behaviour``, a job that measures a model's outputs) is imported from its module."""

from evotool.stages.detect import StageConfig, StageResult, detect_stages, stage_ranges
from evotool.stages.file import STAGES_FILE, StageFile, write_stages

__all__ = ["STAGES_FILE", "StageConfig", "StageFile", "StageResult", "detect_stages", "stage_ranges", "write_stages"]
