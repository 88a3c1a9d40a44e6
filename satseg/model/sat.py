"""The SAT model: a vision network that segments what the text tower's queries name."""

from __future__ import annotations

import torch
from torch import nn

from satseg.model.config import SATConfig
from satseg.model.decoder import QueryDecoder
from satseg.model.mask_head import MaskHead
from satseg.model.text_tower import TextTower
from satseg.model.tokens import ImageTokenizer
from satseg.model.unet import UNet3D


class SATVision(nn.Module):
    """Image patch plus prompt queries to per-prompt mask logits.

    ``forward(image [B, 1, H, W, D] float32 (z-scored), queries [B, N, d_model])`` returns
    ``logits [B, N, H, W, D]``. In training mode with ``deep_supervision`` on it returns a list:
    the full-resolution logits, then those at /2, /4, /8 (``[B, N, H/s, W/s, D/s]``), for a loss
    weighted 1, 1/2, 1/4, 1/8 (normalised). Prompts are independent: no computation mixes them.
    """

    def __init__(self, config: SATConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.deep_supervision = False
        channels = config.unet_channels
        self.backbone = UNet3D(config.in_channels, channels, config.unet_strides, config.convs_per_stage)
        self.tokenizer = ImageTokenizer(
            channels, config.d_model, config.token_mlp_hidden, config.mlp_final_gelu, config.position_encoding
        )
        self.decoder = QueryDecoder(config.d_model, config.decoder_heads, config.decoder_ffn, config.decoder_layers)
        levels = range(config.deep_supervision_levels + 1)
        hidden = config.mask_mlp_hidden or tuple(config.d_model for _ in levels)
        heads = [MaskHead(config.d_model, channels[level], hidden[level], config.mlp_final_gelu) for level in levels]
        self.mask_head = heads[0]
        self.deep_supervision_heads = nn.ModuleList(heads[1:])

    def forward(self, image: torch.Tensor, queries: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        encoder_maps = self.backbone.encode(image)
        tokens, positions = self.tokenizer(encoder_maps)
        # decode() consumes the encoder maps, so each full-resolution map is freed once the decoder has used it.
        decoder_maps = self.backbone.decode(encoder_maps)
        decoded = self.decoder(queries, tokens, positions)
        logits = self.mask_head(decoded, decoder_maps[0])
        if not (self.training and self.deep_supervision):
            return logits
        auxiliary = [
            head(decoded, decoder_maps[level]) for level, head in enumerate(self.deep_supervision_heads, start=1)
        ]
        return [logits, *auxiliary]


class SAT(nn.Module):
    """The whole model: ``vision`` (:class:`SATVision`) and ``text`` (:class:`TextTower`).

    The two halves run separately at inference: prompts are encoded once (and cached), then every
    window of the volume is segmented with the same queries.
    """

    def __init__(self, config: SATConfig, vision: SATVision, text: TextTower) -> None:
        super().__init__()
        self.config = config
        self.vision = vision
        self.text = text

    def encode_prompts(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, modality_ids: torch.Tensor
    ) -> torch.Tensor:
        """Tokenised prompts ``[N, L]`` and modality ids ``[N]`` to queries ``[N, d_model]``."""
        return self.text(input_ids, attention_mask, modality_ids)
