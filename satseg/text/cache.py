"""Prompt embeddings computed once per (term, modality, encoder) and reused, in memory and on disk."""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from satseg.atomic import write_bytes_atomically
from satseg.geometry.volume import check_modality

_ENCODER_HASH = re.compile(r"[0-9A-Za-z_-]+")
_EMBEDDINGS = "embeddings"


def tensor_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Hex sha256 of tensors: names, dtypes, shapes and raw bytes, in name order.

    Equal for equal content whatever the mapping's order or the tensors' device, strides or
    ``requires_grad``; any changed value, dtype, shape or name changes it. Text encoders are
    identified by it (cache keys, checkpoint pairing).
    """
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().to("cpu").contiguous()
        # The JSON header is self-delimiting and fixes the byte count that follows: no ambiguity.
        header = json.dumps([name, str(tensor.dtype), list(tensor.shape)])
        digest.update(header.encode("utf-8"))
        # Viewing as bytes works for every dtype, bfloat16 included (numpy has none).
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


@dataclass(frozen=True)
class CacheStats:
    """Counts over the life of an :class:`EmbeddingCache`, per distinct term of each call.

    Attributes:
        hits: terms served from memory or disk.
        misses: terms sent to the encoder.
    """

    hits: int
    misses: int


Encode = Callable[[list[str], str], torch.Tensor]
"""``encode(terms, modality)`` returns float ``[len(terms), C]`` embeddings."""


class EmbeddingCache:
    """Embeddings keyed by (term, modality, encoder hash), so a term never runs the encoder twice.

    Args:
        encoder_hash: identity of the encoder and everything between it and the embedding
            (e.g. :func:`tensor_sha256` of the text tower); letters, digits, ``_`` and ``-``.
        cache_dir: where to keep one safetensors file per (encoder hash, modality); ``None``
            keeps embeddings in memory only. Files are read on first use of a modality and
            rewritten atomically after each miss; an unreadable file is ignored with a warning.
    """

    def __init__(self, encoder_hash: str, cache_dir: Path | None = None) -> None:
        if not _ENCODER_HASH.fullmatch(encoder_hash):
            raise ValueError(f"encoder_hash must be letters, digits, '_' or '-', got {encoder_hash!r}")
        self.encoder_hash = encoder_hash
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._tables: dict[str, dict[str, torch.Tensor]] = {}
        self._hits = 0
        self._misses = 0

    @property
    def stats(self) -> CacheStats:
        return CacheStats(hits=self._hits, misses=self._misses)

    def get_or_compute(self, terms: Sequence[str], modality: str, encode: Encode) -> torch.Tensor:
        """Embeddings of ``terms`` for ``modality``: float32 ``[N, C]`` on the CPU, rows in ``terms`` order.

        ``encode`` is called at most once, with the distinct terms not cached yet (first-seen
        order), and must return ``[M, C]`` for those M terms. The result is a new tensor;
        changing it leaves the cache intact.

        Raises:
            SatInputError: ``modality`` is not one of ``MODALITIES``.
            ValueError: ``terms`` is empty, or ``encode`` returned the wrong shape.
        """
        modality = check_modality(modality)
        if isinstance(terms, str) or not terms:
            raise ValueError("terms must be a non-empty sequence of strings")
        table = self._table(modality)
        distinct = list(dict.fromkeys(terms))
        missing = [term for term in distinct if term not in table]
        if missing:
            width = next(iter(table.values())).shape[0] if table else None
            embeddings = _checked_embeddings(encode(missing, modality), len(missing), width)
            table.update(zip(missing, embeddings, strict=True))
            self._save(modality, table)
        self._hits += len(distinct) - len(missing)
        self._misses += len(missing)
        return torch.stack([table[term] for term in terms])

    def _path(self, modality: str) -> Path | None:
        if self.cache_dir is None:
            return None
        return self.cache_dir / f"{self.encoder_hash}-{modality}.safetensors"

    def _table(self, modality: str) -> dict[str, torch.Tensor]:
        """The term -> ``[C]`` embedding table of ``modality``, read from disk on first use."""
        if modality not in self._tables:
            path = self._path(modality)
            table: dict[str, torch.Tensor] = {}
            if path is not None and path.exists():
                try:
                    table = _read_table(path, self.encoder_hash, modality)
                except (OSError, ValueError, SafetensorError) as exc:
                    # A cache must never stop a run: drop the file's content and rebuild it.
                    warnings.warn(
                        f"ignoring unreadable embedding cache {path} ({exc}); it will be rebuilt",
                        RuntimeWarning,
                        stacklevel=3,
                    )
            self._tables[modality] = table
        return self._tables[modality]

    def _save(self, modality: str, table: dict[str, torch.Tensor]) -> None:
        """Write ``table`` to its file atomically (a temporary file, then ``os.replace``)."""
        path = self._path(modality)
        if path is None:
            return
        terms = list(table)
        metadata = {"terms": json.dumps(terms), "encoder_hash": self.encoder_hash, "modality": modality}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            data = save({_EMBEDDINGS: torch.stack([table[t] for t in terms])}, metadata=metadata)
            write_bytes_atomically(path, data)
        except OSError as exc:
            # The embeddings are in memory and correct; only their reuse by later runs is lost.
            warnings.warn(f"could not write embedding cache {path} ({exc})", RuntimeWarning, stacklevel=3)


def _checked_embeddings(embeddings: torch.Tensor, rows: int, width: int | None) -> torch.Tensor:
    """``embeddings`` as a float32 CPU copy after checking it is ``[rows, width]`` (any width if None)."""
    shape = list(embeddings.shape)
    if len(shape) != 2 or shape[0] != rows or width not in (None, shape[1]):
        raise ValueError(f"encode returned shape {shape}, expected [{rows}, {width or 'C'}]")
    return embeddings.detach().to(device="cpu", dtype=torch.float32, copy=True)


def _read_table(path: Path, encoder_hash: str, modality: str) -> dict[str, torch.Tensor]:
    """The table stored in ``path``.

    Raises:
        ValueError, SafetensorError, OSError: the file is not a cache file for this
            (encoder hash, modality).
    """
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata() or {}
        embeddings = handle.get_tensor(_EMBEDDINGS)
    if metadata.get("encoder_hash") != encoder_hash or metadata.get("modality") != modality:
        raise ValueError("written for another encoder or modality")
    terms = json.loads(metadata.get("terms", "null"))
    if not (isinstance(terms, list) and all(isinstance(t, str) for t in terms)):
        raise ValueError("no term list")
    if embeddings.dtype != torch.float32 or embeddings.ndim != 2 or embeddings.shape[0] != len(terms):
        raise ValueError(f"{len(terms)} terms but embeddings {embeddings.dtype} {list(embeddings.shape)}")
    return dict(zip(terms, embeddings, strict=True))
