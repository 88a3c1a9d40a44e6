"""The builder registry: ``build_sat("nano")`` returns a fresh model of that size."""

from __future__ import annotations

from satseg.model.config import SATConfig, get_config
from satseg.model.sat import SAT, SATVision
from satseg.model.text_tower import TextTower, load_hf_encoder
from satseg.text.encoder_source import resolve_text_encoder


def build_text_tower(config: SATConfig, *, pretrained_encoder: bool = True) -> TextTower:
    """The text tower with the encoder named by ``config.text_encoder`` (weights loaded if asked)."""
    encoder = load_hf_encoder(resolve_text_encoder(config.text_encoder), pretrained=pretrained_encoder)
    hidden_size = int(encoder.config.hidden_size)
    if hidden_size != config.text_hidden_size:
        raise ValueError(
            f"text encoder {config.text_encoder!r} has hidden size {hidden_size}, "
            f"the config expects {config.text_hidden_size}"
        )
    return TextTower(encoder, hidden_size, config.d_model, config.num_modalities)


def build_sat(size: str | SATConfig, *, pretrained_encoder: bool = True) -> SAT:
    """A randomly initialised SAT of a registered size (``tiny``, ``nano``, ``pro``) or a config.

    The text encoder starts from its pretrained weights unless ``pretrained_encoder`` is False.
    """
    config = size if isinstance(size, SATConfig) else get_config(size)
    return SAT(config, SATVision(config), build_text_tower(config, pretrained_encoder=pretrained_encoder))
