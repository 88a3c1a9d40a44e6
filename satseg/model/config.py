"""Size configurations of the SAT model family and their registry."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from satseg.geometry.volume import MODALITIES

POSITION_ENCODINGS = ("blocks", "interleaved")


@dataclass(frozen=True)
class SATConfig:
    """Hyper-parameters of one SAT model size.

    The U-Net has one stage per entry of ``unet_channels``; ``unet_strides[i]`` is the
    downsampling factor entering stage ``i`` (the first is 1), so the bottleneck sits at
    ``prod(unet_strides)``. ``patch_size`` is ``(H, W, D)`` in voxels of the 1x1x3 mm model
    grid and must be divisible by that factor.

    The last four fields exist to reproduce the published SAT checkpoints exactly (sizes
    ``nano-reference`` and ``pro-reference``, filled by ``export/import_sat.py``); their defaults
    are this project's own wiring. ``token_mlp_hidden`` is the hidden width of the image-token MLP
    (``None``: ``d_model``); ``mask_mlp_hidden`` the hidden widths of the mask head and then of each
    deep-supervision head (empty: ``d_model`` for all); ``mlp_final_gelu`` puts a GELU after the
    last Linear of those MLPs; ``position_encoding`` is ``"blocks"`` (per axis, all sines then all
    cosines) or ``"interleaved"`` (per axis, sine/cosine pairs, the reference's layout).
    """

    name: str
    unet_channels: tuple[int, ...]
    convs_per_stage: int
    patch_size: tuple[int, int, int]
    d_model: int = 768
    decoder_layers: int = 6
    decoder_heads: int = 8
    decoder_ffn: int = 2048
    unet_strides: tuple[int, ...] = (1, 2, 2, 2, 2, 2)
    in_channels: int = 1
    deep_supervision_levels: int = 3
    text_encoder: str = "minilm-l6"
    text_hidden_size: int = 384
    num_modalities: int = len(MODALITIES)
    extra: dict[str, Any] = field(default_factory=dict)
    token_mlp_hidden: int | None = None
    mask_mlp_hidden: tuple[int, ...] = ()
    mlp_final_gelu: bool = False
    position_encoding: str = "blocks"

    @property
    def downsampling(self) -> int:
        """Total downsampling factor from the input patch to the bottleneck."""
        factor = 1
        for stride in self.unet_strides:
            factor *= stride
        return factor

    @property
    def token_grid(self) -> tuple[int, int, int]:
        """Bottleneck grid ``(h, w, d)``: the number of image tokens is its product."""
        return tuple(size // self.downsampling for size in self.patch_size)  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SATConfig:
        tuples = ("unet_channels", "patch_size", "unet_strides", "mask_mlp_hidden")
        return cls(**{key: tuple(value) if key in tuples else value for key, value in values.items()})

    def validate(self) -> None:
        if len(self.unet_channels) != len(self.unet_strides) or self.unet_strides[0] != 1:
            raise ValueError("unet_channels and unet_strides need one entry per stage, the first stride 1")
        if any(size % self.downsampling for size in self.patch_size):
            raise ValueError(f"patch_size {self.patch_size} must be divisible by {self.downsampling}")
        if self.d_model % self.decoder_heads:
            raise ValueError(f"d_model {self.d_model} must be divisible by decoder_heads {self.decoder_heads}")
        if self.mask_mlp_hidden and len(self.mask_mlp_hidden) != 1 + self.deep_supervision_levels:
            raise ValueError("mask_mlp_hidden needs one width for the mask head and one per deep-supervision level")
        if self.position_encoding not in POSITION_ENCODINGS:
            raise ValueError(f"position_encoding must be one of {', '.join(POSITION_ENCODINGS)}")


SAT_CONFIGS: dict[str, SATConfig] = {
    # CPU tests, the demo and the memory benchmark: the same wiring at a fraction of the width.
    "tiny": SATConfig(
        name="tiny",
        unet_channels=(8, 16, 32, 64, 96, 128),
        convs_per_stage=2,
        patch_size=(96, 96, 32),
        d_model=192,
        decoder_layers=2,
        decoder_heads=4,
        decoder_ffn=384,
    ),
    # The published SAT-Nano (110M vision parameters) and SAT-Pro widths (docs/architecture.md).
    "nano": SATConfig(
        name="nano",
        unet_channels=(64, 64, 128, 256, 512, 768),
        convs_per_stage=2,
        patch_size=(288, 288, 96),
    ),
    "pro": SATConfig(
        name="pro",
        unet_channels=(128, 128, 256, 512, 1024, 1536),
        convs_per_stage=3,
        patch_size=(288, 288, 96),
    ),
}
# The vision networks of the published SAT-Nano and SAT-Pro as zhaoziheng/SAT builds them, for
# checkpoints imported by export/import_sat.py (which also sets their BioLORD text encoder).
for _base, _token_hidden, _mask_hidden in (
    ("nano", 768, (256, 256, 384, 512)),
    ("pro", 1536, (384, 384, 512, 512)),
):
    SAT_CONFIGS[f"{_base}-reference"] = replace(
        SAT_CONFIGS[_base],
        name=f"{_base}-reference",
        token_mlp_hidden=_token_hidden,
        mask_mlp_hidden=_mask_hidden,
        mlp_final_gelu=True,
        position_encoding="interleaved",
    )


def get_config(size: str) -> SATConfig:
    """The registered config of a model size (``tiny``, ``nano``, ``pro``, ``nano-reference``, ``pro-reference``)."""
    try:
        return SAT_CONFIGS[size]
    except KeyError:
        raise ValueError(f"unknown model size {size!r}; known sizes: {', '.join(SAT_CONFIGS)}") from None
