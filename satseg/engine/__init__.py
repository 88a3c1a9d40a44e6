"""The inference engine every path shares: prompt plan, windows, clean-up, threshold and merge, statistics."""

from satseg.engine.components import keep_largest_component
from satseg.engine.labelmap import LabelMapAccumulator
from satseg.engine.plan import PromptPlan, plan_prompts
from satseg.engine.run import (
    MaskSink,
    Outputs,
    WindowRun,
    collect,
    probabilities_on_input_grid,
    prompt_probabilities,
    segment_prepared,
)

__all__ = [
    "LabelMapAccumulator",
    "MaskSink",
    "Outputs",
    "PromptPlan",
    "WindowRun",
    "collect",
    "keep_largest_component",
    "plan_prompts",
    "probabilities_on_input_grid",
    "prompt_probabilities",
    "segment_prepared",
]
