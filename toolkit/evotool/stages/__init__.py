"""Stage boundaries: the detector (``detect``)."""

from evotool.stages.detect import StageConfig, StageResult, detect_stages, stage_ranges, token_critical_layer, token_mutation_layer

__all__ = ["StageConfig", "StageResult", "detect_stages", "stage_ranges", "token_critical_layer", "token_mutation_layer"]
