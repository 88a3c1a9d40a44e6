"""The SAT model family (docs/architecture.md): U-Net backbone, query decoder, mask head, text tower."""

from satseg.model.build import build_sat, build_text_tower
from satseg.model.config import SAT_CONFIGS, SATConfig, get_config
from satseg.model.sat import SAT, SATVision
from satseg.model.text_tower import TextTower

__all__ = [
    "SAT",
    "SAT_CONFIGS",
    "SATConfig",
    "SATVision",
    "TextTower",
    "build_sat",
    "build_text_tower",
    "get_config",
]
