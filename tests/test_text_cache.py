"""The prompt embedding cache and the tensor hash that names text encoders."""

from __future__ import annotations

import warnings
import zlib
from pathlib import Path

import pytest
import torch

from satseg.errors import SatInputError
from satseg.text import CacheStats, EmbeddingCache, tensor_sha256

WIDTH = 4


class RecordingEncoder:
    """A deterministic fake encoder that records what it was asked to encode."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], str]] = []

    def __call__(self, terms: list[str], modality: str) -> torch.Tensor:
        self.calls.append((list(terms), modality))
        return torch.stack([embedding(term, modality) for term in terms]).to(torch.float64)


def embedding(term: str, modality: str) -> torch.Tensor:
    """``[WIDTH]`` float32, different for every (term, modality)."""
    seed = zlib.crc32(f"{modality}:{term}".encode())
    return torch.arange(WIDTH, dtype=torch.float32) + seed % 1000


def expected(terms: list[str], modality: str) -> torch.Tensor:
    return torch.stack([embedding(term, modality) for term in terms])


def test_repeated_terms_are_encoded_once_in_order() -> None:
    cache, encode = EmbeddingCache("enc"), RecordingEncoder()
    terms = ["liver", "spleen", "liver", "left kidney", "spleen"]
    result = cache.get_or_compute(terms, "ct", encode)
    assert encode.calls == [(["liver", "spleen", "left kidney"], "ct")]
    assert result.dtype == torch.float32 and result.shape == (5, WIDTH)
    torch.testing.assert_close(result, expected(terms, "ct"))
    assert cache.stats == CacheStats(hits=0, misses=3)


def test_only_missing_terms_are_encoded() -> None:
    cache, encode = EmbeddingCache("enc"), RecordingEncoder()
    cache.get_or_compute(["liver", "spleen"], "ct", encode)
    result = cache.get_or_compute(["spleen", "aorta", "liver"], "ct", encode)
    assert encode.calls[1] == (["aorta"], "ct")
    torch.testing.assert_close(result, expected(["spleen", "aorta", "liver"], "ct"))
    cache.get_or_compute(["liver"], "ct", encode)
    assert len(encode.calls) == 2
    assert cache.stats == CacheStats(hits=3, misses=3)


def test_modalities_are_cached_apart() -> None:
    cache, encode = EmbeddingCache("enc"), RecordingEncoder()
    cache.get_or_compute(["liver"], "ct", encode)
    result = cache.get_or_compute(["liver"], "MRI", encode)
    assert encode.calls == [(["liver"], "ct"), (["liver"], "mri")]
    torch.testing.assert_close(result, expected(["liver"], "mri"))


def test_result_is_a_copy() -> None:
    cache, encode = EmbeddingCache("enc"), RecordingEncoder()
    cache.get_or_compute(["liver"], "ct", encode).zero_()
    torch.testing.assert_close(cache.get_or_compute(["liver"], "ct", encode), expected(["liver"], "ct"))


def test_bad_arguments() -> None:
    cache, encode = EmbeddingCache("enc"), RecordingEncoder()
    with pytest.raises(SatInputError, match='unknown modality "xray"; accepted: ct, mri, us, pet'):
        cache.get_or_compute(["liver"], "xray", encode)
    with pytest.raises(ValueError, match="non-empty"):
        cache.get_or_compute([], "ct", encode)
    with pytest.raises(ValueError, match=r"expected \[2, C\]"):
        cache.get_or_compute(["liver", "spleen"], "ct", lambda terms, modality: torch.zeros(1, WIDTH))
    cache.get_or_compute(["liver"], "ct", encode)
    with pytest.raises(ValueError, match=rf"expected \[1, {WIDTH}\]"):
        cache.get_or_compute(["spleen"], "ct", lambda terms, modality: torch.zeros(1, WIDTH + 1))
    with pytest.raises(ValueError, match="encoder_hash"):
        EmbeddingCache("../escape")


def test_persists_across_instances(tmp_path: Path) -> None:
    first = RecordingEncoder()
    EmbeddingCache("enc", tmp_path).get_or_compute(["liver", "spleen"], "ct", first)
    EmbeddingCache("enc", tmp_path).get_or_compute(["aorta"], "ct", first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["enc-ct.safetensors"]  # no temporary files left

    again, encode = EmbeddingCache("enc", tmp_path), RecordingEncoder()
    result = again.get_or_compute(["aorta", "liver", "spleen"], "ct", encode)
    assert encode.calls == []
    torch.testing.assert_close(result, expected(["aorta", "liver", "spleen"], "ct"))
    assert again.stats == CacheStats(hits=3, misses=0)

    other_encoder, encode = EmbeddingCache("other", tmp_path), RecordingEncoder()
    other_encoder.get_or_compute(["liver"], "ct", encode)
    assert encode.calls == [(["liver"], "ct")]


@pytest.mark.parametrize("content", [b"", b"not a safetensors file", b"\x08\x00\x00\x00\x00\x00\x00\x00{}"])
def test_corrupt_cache_file_is_rebuilt(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "enc-ct.safetensors").write_bytes(content)
    cache, encode = EmbeddingCache("enc", tmp_path), RecordingEncoder()
    with pytest.warns(RuntimeWarning, match="ignoring unreadable embedding cache"):
        result = cache.get_or_compute(["liver"], "ct", encode)
    assert encode.calls == [(["liver"], "ct")]
    torch.testing.assert_close(result, expected(["liver"], "ct"))

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rewritten file reads cleanly
        rebuilt, encode = EmbeddingCache("enc", tmp_path), RecordingEncoder()
        rebuilt.get_or_compute(["liver"], "ct", encode)
    assert encode.calls == []


def test_cache_file_of_another_encoder_is_not_trusted(tmp_path: Path) -> None:
    EmbeddingCache("other", tmp_path).get_or_compute(["liver"], "ct", RecordingEncoder())
    (tmp_path / "other-ct.safetensors").rename(tmp_path / "enc-ct.safetensors")
    cache, encode = EmbeddingCache("enc", tmp_path), RecordingEncoder()
    with pytest.warns(RuntimeWarning, match="another encoder"):
        cache.get_or_compute(["liver"], "ct", encode)
    assert encode.calls == [(["liver"], "ct")]


def test_unwritable_cache_dir_warns_and_still_answers(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    cache, encode = EmbeddingCache("enc", blocker), RecordingEncoder()
    with pytest.warns(RuntimeWarning, match="could not write embedding cache"):
        result = cache.get_or_compute(["liver"], "ct", encode)
    torch.testing.assert_close(result, expected(["liver"], "ct"))
    cache.get_or_compute(["liver"], "ct", encode)
    assert len(encode.calls) == 1  # still cached in memory


def test_tensor_sha256() -> None:
    weights = {"a.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a.bias": torch.zeros(2)}
    digest = tensor_sha256(weights)
    assert len(digest) == 64
    assert tensor_sha256(dict(reversed(list(weights.items())))) == digest
    assert tensor_sha256({k: v.clone().requires_grad_() for k, v in weights.items()}) == digest
    assert tensor_sha256({**weights, "a.weight": weights["a.weight"].t().contiguous().t()}) == digest

    changed_value = weights["a.weight"].clone()
    changed_value[1, 2] += 1e-3
    variants = [
        {**weights, "a.weight": changed_value},
        {**weights, "a.weight": weights["a.weight"].reshape(3, 2)},
        {**weights, "a.weight": weights["a.weight"].double()},
        {"b.weight": weights["a.weight"], "a.bias": weights["a.bias"]},
        {"a.weight": weights["a.weight"]},
    ]
    assert len({digest, *(tensor_sha256(variant) for variant in variants)}) == len(variants) + 1
    assert tensor_sha256({"x": torch.ones(2, dtype=torch.bfloat16)}) != tensor_sha256({"x": torch.ones(2)})
