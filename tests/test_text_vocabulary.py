"""The anatomy vocabulary, prompt parsing, the text encoder source and the prompt tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from satseg.errors import SatInputError
from satseg.geometry.volume import MODALITIES
from satseg.text import (
    DEFAULT_TEXT_ENCODER,
    PromptTokenizer,
    Term,
    Vocabulary,
    check_prompts,
    normalize_prompt,
    parse_prompt_list,
    resolve_text_encoder,
    untrained_warning,
)
from satseg.text.vocabulary import MAX_PROMPT_CHARS

PACKAGED_JSON = Path(__file__).parents[1] / "satseg" / "text" / "vocabulary.json"


@pytest.fixture(scope="module")
def vocabulary() -> Vocabulary:
    return Vocabulary.load()


def shared_names(shared_data: Path, relative: str) -> list[str]:
    return list(json.loads((shared_data / relative).read_text()).values())


def write_vocabulary(path: Path, terms: list[dict[str, object]]) -> Path:
    path.write_text(json.dumps({"version": 1, "terms": terms}))
    return path


# --- normalisation and prompt lists ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("liver", "liver"),
        ("kidney_left", "left kidney"),
        ("adrenal gland right", "right adrenal gland"),
        ("  Adrenal_Gland_RIGHT. ", "right adrenal gland"),
        ("left   kidney", "left kidney"),
        ("ＬＩＶＥＲ", "liver"),  # full-width letters (NFKC)
        ('"spleen"?!', "spleen"),
        ("brain-stem", "brain-stem"),
        ("rib_left_3", "rib left 3"),  # side not last: left as is
        ("left", "left"),
        ("  ...  ", ""),
    ],
)
def test_normalize_prompt(text: str, expected: str) -> None:
    assert normalize_prompt(text) == expected


def test_parse_prompt_list_splits_strips_and_deduplicates() -> None:
    assert parse_prompt_list("liver, spleen,Liver , kidney_left,left kidney") == [
        "liver",
        "spleen",
        "kidney_left",
    ]
    assert parse_prompt_list(["liver", " spleen ", "LIVER"]) == ["liver", "spleen"]


@pytest.mark.parametrize("given", ["liver,,spleen", "liver,spleen,", ["liver", " "]])
def test_a_blank_item_is_refused_by_position(given: str | list[str]) -> None:
    """One rule for the CLI and the server: a blank item refuses the list (it was silently dropped here)."""
    with pytest.raises(SatInputError, match=r"^prompt \d of \d is blank"):
        parse_prompt_list(given)


def test_an_over_long_prompt_is_refused_with_a_short_quotation() -> None:
    """A 20,000-character prompt once came back whole in the error (100 KB over HTTP, over gRPC's 16 KB
    metadata limit, where the client mistook it for an outage)."""
    long_prompt = "liver" + "x" * 20_000 + "\x1b[31m"
    with pytest.raises(SatInputError) as caught:
        check_prompts(["spleen", long_prompt])
    message = str(caught.value)
    assert message.startswith("prompt 2 (") and f"longer than {MAX_PROMPT_CHARS} characters" in message
    assert len(message) < 200 and "\x1b" not in message
    assert len(check_prompts(["a" * MAX_PROMPT_CHARS])[0]) == MAX_PROMPT_CHARS


def test_unknown_prompt_errors_quote_a_short_prefix_without_control_characters() -> None:
    with pytest.raises(SatInputError) as caught:
        Vocabulary.load().resolve("\x1b[2Jnot an organ" + "y" * 300)
    message = str(caught.value)
    assert "\x1b" not in message and len(message) < 400 and "not an organ" in message


@pytest.mark.parametrize("given", ["", " , ,", [], ["", "  "]])
def test_empty_prompt_list_is_an_error(given: str | list[str]) -> None:
    with pytest.raises(SatInputError) as caught:
        parse_prompt_list(given)
    assert str(caught.value) == ('no prompts given; pass one or more anatomy terms, e.g. --prompts "liver,spleen"')


# --- the packaged vocabulary -----------------------------------------------------------------------


def test_packaged_vocabulary_is_large_sorted_and_normalised(vocabulary: Vocabulary) -> None:
    assert len(vocabulary) >= 250
    document = json.loads(PACKAGED_JSON.read_text())
    names = [entry["term"] for entry in document["terms"]]
    assert names == sorted(names), "vocabulary.json must be sorted by term"
    for term in vocabulary.terms:
        for spelling in (term.name, *term.synonyms):
            assert normalize_prompt(spelling) == spelling, f"{spelling!r} is not stored normalised"
        # Every canonical term can be given in a comma-separated --prompts list.
        assert "," not in term.name
        assert term.modalities and set(term.modalities) <= set(MODALITIES)


def test_no_spelling_names_two_terms() -> None:
    owner: dict[str, str] = {}
    for entry in json.loads(PACKAGED_JSON.read_text())["terms"]:
        for spelling in (entry["term"], *entry["synonyms"]):
            key = normalize_prompt(spelling)
            assert owner.setdefault(key, entry["term"]) == entry["term"], (
                f"{spelling!r} names both {owner[key]!r} and {entry['term']!r}"
            )


def test_colliding_synonym_is_refused(tmp_path: Path) -> None:
    path = write_vocabulary(
        tmp_path / "vocabulary.json",
        [
            {"term": "liver", "synonyms": ["organ"], "modalities": ["ct"]},
            {"term": "spleen", "synonyms": ["Organ"], "modalities": ["ct"]},
        ],
    )
    with pytest.raises(SatInputError, match='"Organ" names both "liver" and "spleen"'):
        Vocabulary.load(path)


@pytest.mark.parametrize(
    ("prompt", "term"),
    [
        ("Kidney_Left", "left kidney"),
        ("left renal", "left kidney"),
        ("gall bladder", "gallbladder"),
        ("bladder", "urinary bladder"),
        ("IVC", "inferior vena cava"),
        ("spinal canal", "spinal cord"),
        ("upper lobe of left lung", "left lung upper lobe"),
        ("lung_upper_lobe_left", "left lung upper lobe"),
        ("vertebrae_L1", "l1 vertebra"),
        ("vertebra l1", "l1 vertebra"),
        ("L1", "l1 vertebra"),
        ("rib_left_3", "left 3rd rib"),
        ("brain-stem", "brainstem"),
        ("brain stem", "brainstem"),
        ("CSF", "cerebrospinal fluid"),
        ("Hippocampus_L", "left hippocampus"),
        ("Precentral_L", "left precentral gyrus"),
        ("right superior frontal gyrus, orbital part", "right orbital part of superior frontal gyrus"),
        ("Cerebelum_Crus1_L", "left cerebellar crus 1"),
        ("Vermis_1_2", "cerebellar vermis 1 2"),
    ],
)
def test_resolve_terms_and_synonyms(vocabulary: Vocabulary, prompt: str, term: str) -> None:
    assert vocabulary.resolve(prompt) == term
    assert prompt in vocabulary


def test_structure_in_both_brain_atlases_is_one_term(vocabulary: Vocabulary) -> None:
    (hippocampus,) = [term for term in vocabulary.terms if term.name == "left hippocampus"]
    assert hippocampus == Term("left hippocampus", ("hippocampus l",), ("mri",), "brain", single_component=True)


@pytest.mark.parametrize(
    ("names_file", "modality"),
    [("totalseg/classes_total.json", "ct"), ("totalseg/classes_total_mr.json", "mri")],
)
def test_every_totalsegmentator_class_resolves(
    vocabulary: Vocabulary, shared_data: Path, names_file: str, modality: str
) -> None:
    usable = set(vocabulary.for_modality(modality))
    for name in shared_names(shared_data, names_file):
        assert vocabulary.resolve(name) in usable, f"{name} ({modality})"


@pytest.mark.parametrize("names_file", ["synthseg/labels.json", "mni/aal116_labels.json"])
def test_every_brain_label_resolves_for_mri(vocabulary: Vocabulary, shared_data: Path, names_file: str) -> None:
    usable = set(vocabulary.for_modality("mri"))
    resolved = [vocabulary.resolve(name) for name in shared_names(shared_data, names_file)]
    assert set(resolved) <= usable
    assert len(set(resolved)) == len(resolved), "two atlas labels map to one term"


def test_unknown_prompt_lists_closest_terms_on_one_line(vocabulary: Vocabulary) -> None:
    with pytest.raises(SatInputError) as caught:
        vocabulary.resolve("livr")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith('unknown prompt "livr"; closest known terms: liver')
    assert message.endswith("pass allow_free_text (--allow-free-text) to send free text to the encoder")


def test_closest_terms_are_canonical_and_at_most_five(vocabulary: Vocabulary) -> None:
    with pytest.raises(SatInputError) as caught:
        vocabulary.resolve("left kidny\nplease")
    message = str(caught.value)
    assert "\n" not in message
    listed = message.split("closest known terms: ")[1].split(";")[0].split(", ")
    assert 1 <= len(listed) <= 5
    assert all(name in {term.name for term in vocabulary.terms} for name in listed)


def test_unknown_prompt_far_from_everything(vocabulary: Vocabulary) -> None:
    with pytest.raises(SatInputError, match="no known term is close"):
        vocabulary.resolve("qxzvw")


def test_allow_free_text_returns_the_normalised_prompt(vocabulary: Vocabulary) -> None:
    assert vocabulary.resolve("Tumour  Core.", allow_free_text=True) == "tumour core"
    assert vocabulary.resolve("kidney_left", allow_free_text=True) == "left kidney"
    assert vocabulary.resolve_all("liver, tumour core", allow_free_text=True) == ["liver", "tumour core"]


@pytest.mark.parametrize("prompt", ["", "   ", "_.,"])
def test_empty_prompt_is_an_error(vocabulary: Vocabulary, prompt: str) -> None:
    with pytest.raises(SatInputError, match="empty prompt"):
        vocabulary.resolve(prompt, allow_free_text=True)


def test_resolve_all_deduplicates_after_resolution(vocabulary: Vocabulary) -> None:
    assert vocabulary.resolve_all(["kidney_left", "liver", "left renal", "hepar"], allow_free_text=True) == [
        "left kidney",
        "liver",
        "hepar",
    ]
    assert vocabulary.resolve_all("IVC, inferior vena cava") == ["inferior vena cava"]
    with pytest.raises(SatInputError, match="no prompts given"):
        vocabulary.resolve_all([])


def test_for_modality(vocabulary: Vocabulary) -> None:
    ct, mri = vocabulary.for_modality("ct"), vocabulary.for_modality("MRI")
    assert "liver" in ct and "liver" in mri
    assert "left 3rd rib" in ct and "left 3rd rib" not in mri
    assert "left hippocampus" in mri and "left hippocampus" not in ct
    assert ct == sorted(ct)
    assert vocabulary.for_modality("us") == []
    with pytest.raises(SatInputError, match='unknown modality "xray"; accepted: ct, mri, us, pet'):
        vocabulary.for_modality("xray")


def test_sha256_is_stable_and_tracks_content(tmp_path: Path, vocabulary: Vocabulary) -> None:
    assert Vocabulary.load().sha256 == vocabulary.sha256
    assert len(vocabulary.sha256) == 64
    terms = [
        {"term": "liver", "synonyms": ["hepar", "hepatic"], "modalities": ["ct", "mri"], "region": "abdomen"},
        {"term": "spleen", "synonyms": [], "modalities": ["ct"], "region": "abdomen"},
    ]
    reordered = [terms[1], {**terms[0], "synonyms": ["hepatic", "hepar"], "modalities": ["mri", "ct"]}]
    changed = [{**terms[0], "modalities": ["ct"]}, terms[1]]
    first = Vocabulary.load(write_vocabulary(tmp_path / "a.json", terms)).sha256
    assert Vocabulary.load(write_vocabulary(tmp_path / "b.json", reordered)).sha256 == first
    assert Vocabulary.load(write_vocabulary(tmp_path / "c.json", changed)).sha256 != first


def test_bad_vocabulary_files_are_input_errors(tmp_path: Path) -> None:
    with pytest.raises(SatInputError, match="cannot read vocabulary"):
        Vocabulary.load(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(SatInputError, match="not valid JSON"):
        Vocabulary.load(tmp_path / "broken.json")
    (tmp_path / "old.json").write_text(json.dumps({"version": 0, "terms": []}))
    with pytest.raises(SatInputError, match='"version": 1'):
        Vocabulary.load(tmp_path / "old.json")
    bad_modality = write_vocabulary(tmp_path / "m.json", [{"term": "liver", "modalities": ["xray"]}])
    with pytest.raises(SatInputError, match='"modalities" of "liver"'):
        Vocabulary.load(bad_modality)
    twice = write_vocabulary(
        tmp_path / "t.json",
        [{"term": "liver", "modalities": ["ct"]}, {"term": "liver", "modalities": ["mri"]}],
    )
    with pytest.raises(SatInputError, match='term "liver" is listed twice'):
        Vocabulary.load(twice)
    unnormalised = write_vocabulary(tmp_path / "u.json", [{"term": "kidney_left", "modalities": ["ct"]}])
    with pytest.raises(SatInputError, match='term "kidney_left" must be written as normalize_prompt gives it'):
        Vocabulary.load(unnormalised)


# --- text encoder source and tokenizer -------------------------------------------------------------


def test_resolve_text_encoder(tmp_path: Path) -> None:
    packaged = resolve_text_encoder(DEFAULT_TEXT_ENCODER)
    assert (packaged / "config.json").is_file()
    (tmp_path / "config.json").write_text("{}")
    assert resolve_text_encoder(str(tmp_path)) == tmp_path
    with pytest.raises(SatInputError, match="is not a known identity or a folder"):
        resolve_text_encoder(str(tmp_path / "nowhere"))
    with pytest.raises(SatInputError, match=r"has no config\.json"):
        resolve_text_encoder(str(tmp_path.parent))


def test_tokenizer_pads_to_longest_and_truncates() -> None:
    tokenizer = PromptTokenizer(resolve_text_encoder(DEFAULT_TEXT_ENCODER), max_length=8)
    batch = tokenizer(["liver", "left kidney", "left orbital part of superior frontal gyrus"])
    assert set(batch) == {"input_ids", "attention_mask"}
    for tensor in batch.values():
        assert tensor.dtype == torch.int64
        assert tensor.shape == (3, 8)
    assert batch["attention_mask"].sum(dim=1).tolist() == [3, 4, 8]  # [CLS] words [SEP], cut at 8

    short = tokenizer(["liver", "left kidney"])
    assert short["input_ids"].shape == (2, 4)  # padded to the longest, not to max_length
    assert short["input_ids"][0, -1].item() == 0 and short["attention_mask"][0].tolist() == [1, 1, 1, 0]


def test_a_term_is_known_when_trained_or_made_of_trained_parts() -> None:
    vocabulary = Vocabulary.load()
    trained = ["left kidney", "right kidney", "liver"]
    assert vocabulary.untrained(["kidney", "liver", "pancreas", "left lung"], trained) == ["pancreas", "left lung"]
    assert vocabulary.untrained(["pancreas"], None) == [], "nothing is said without a record of the trained terms"
    assert vocabulary.known_terms(trained) == ["kidney", "left kidney", "liver", "right kidney"]
    assert untrained_warning(["pancreas"]).startswith('not trained on "pancreas": the model runs')
