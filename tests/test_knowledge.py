"""The anatomy knowledge tree and the serving vocabulary built from it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from satseg.errors import SatInputError
from satseg.text import Term, Vocabulary, normalize_prompt
from satseg_training.knowledge import PAIR_KINDS, Concept, KnowledgeTree, Pair
from satseg_training.knowledge.build_vocabulary import (
    PACKAGED_VOCABULARY,
    format_vocabulary,
    main,
    vocabulary_document,
)
from satseg_training.knowledge.tree import KNOWLEDGE_FILE


@pytest.fixture(scope="module")
def tree() -> KnowledgeTree:
    return KnowledgeTree.load()


def concept(
    term: str, *, children: tuple[str, ...] = (), modalities: tuple[str, ...] = ("ct",), **fields: object
) -> Concept:
    """A concept with defaults for what a test does not care about."""
    values: dict[str, object] = {
        "synonyms": (),
        "definition": f"the {term}",
        "is_a": (),
        "part_of": (),
        "region": "abdomen",
        "sources": ("satseg",) if children else ("totalsegmentator",),
    }
    values.update(fields)
    return Concept(term=term, children=children, modalities=modalities, **values)  # type: ignore[arg-type]


# --- the packaged tree -----------------------------------------------------------------------------


def test_tree_covers_the_vocabulary_with_its_synonyms_and_modalities(tree: KnowledgeTree) -> None:
    assert len(tree) >= 250
    for term in Vocabulary.load().terms:
        assert term.name in tree, term.name
        known = tree[term.name]
        assert set(term.synonyms) == set(known.synonyms)
        assert term.modalities == known.modalities
        assert term.children == known.children


def test_file_is_sorted_normalised_and_complete(tree: KnowledgeTree) -> None:
    lines = KNOWLEDGE_FILE.read_text("utf-8").splitlines()
    terms = [json.loads(line)["term"] for line in lines]
    assert terms == sorted(terms) and len(terms) == len(tree)
    for item in tree.concepts:
        assert all(normalize_prompt(s) == s for s in (item.term, *item.synonyms))
        assert item.definition.strip() and item.sources


def test_no_spelling_names_two_concepts(tree: KnowledgeTree) -> None:
    owner: dict[str, str] = {}
    for item in tree.concepts:
        for spelling in (item.term, *item.synonyms):
            assert owner.setdefault(spelling, item.term) == item.term, f"{spelling!r}: {owner[spelling]}, {item.term}"


def test_links_name_known_terms_and_parents_cover_their_childrens_modalities(tree: KnowledgeTree) -> None:
    for item in tree.concepts:
        for linked in (*item.is_a, *item.part_of, *item.children):
            assert linked in tree, f"{item.term} -> {linked}"
        if item.children:
            union = {m for child in item.children for m in tree[child].modalities}
            assert union <= set(item.modalities)
            if not item.label_sources:  # a pure parent can be segmented exactly where its children can
                assert set(item.modalities) == union, item.term


@pytest.mark.parametrize(
    ("parent", "children"),
    [
        ("kidney", ("left kidney", "right kidney")),
        ("lung", ("left lung", "right lung")),
        ("left lung", ("left lung upper lobe", "left lung lower lobe")),
        ("lumbar vertebrae", ("l1 vertebra", "l2 vertebra", "l3 vertebra", "l4 vertebra", "l5 vertebra")),
        ("cerebral white matter", ("left cerebral white matter", "right cerebral white matter")),
        ("precentral gyrus", ("left precentral gyrus", "right precentral gyrus")),
        ("hip bone", ("left hip bone", "right hip bone")),
    ],
)
def test_parents_of_the_vocabulary(tree: KnowledgeTree, parent: str, children: tuple[str, ...]) -> None:
    assert tree.children_of(parent) == children
    assert Vocabulary.load().children_of(parent) == children


def test_spellings_resolve_to_parents(tree: KnowledgeTree) -> None:
    assert tree.resolve("Kidneys") == "kidney"
    assert tree.resolve("clavicula") == "clavicle"
    assert tree.resolve("Precentral") == "precentral gyrus"
    assert Vocabulary.load().resolve("lumbar spine") == "lumbar vertebrae"


def test_categories_are_knowledge_only(tree: KnowledgeTree) -> None:
    organ = tree["organ"]
    assert organ.children == () and organ.modalities == ()
    assert "organ" not in Vocabulary.load()
    assert tree["kidney"].is_a == ("organ",)


# --- expand ----------------------------------------------------------------------------------------


LOBES = {
    "left lung upper lobe",
    "left lung lower lobe",
    "right lung upper lobe",
    "right lung middle lobe",
    "right lung lower lobe",
}


def test_expand_keeps_a_trained_parent(tree: KnowledgeTree) -> None:
    assert tree.expand("kidney", {"kidney", "left kidney", "right kidney"}) == ["kidney"]


def test_expand_uses_children_when_all_are_trained(tree: KnowledgeTree) -> None:
    assert tree.expand("kidney", {"left kidney", "right kidney", "liver"}) == ["left kidney", "right kidney"]


def test_expand_keeps_the_term_when_a_child_is_missing(tree: KnowledgeTree) -> None:
    assert tree.expand("kidney", {"left kidney", "liver"}) == ["kidney"]
    assert tree.expand("lung", {"left lung", "right lung upper lobe"}) == ["lung"]
    assert tree.expand("liver", set()) == ["liver"]  # a leaf nobody trained


def test_expand_recurses_and_mixes_levels(tree: KnowledgeTree) -> None:
    right_lung = ["right lung upper lobe", "right lung middle lobe", "right lung lower lobe"]
    assert tree.expand("lung", LOBES) == ["left lung upper lobe", "left lung lower lobe", *right_lung]
    assert tree.expand("lung", {"left lung", *right_lung}) == ["left lung", *right_lung]
    spine = tree.expand(
        "vertebrae", {f"{p}{i} vertebra" for p, n in (("c", 7), ("t", 12), ("l", 5)) for i in range(1, n + 1)}
    )
    assert len(spine) == 24 and spine[0] == "c1 vertebra" and spine[-1] == "l5 vertebra"


def test_expand_segments_a_shared_leaf_once() -> None:
    tree = KnowledgeTree(
        [
            concept("a", children=("b", "c")),
            concept("b", children=("d",)),
            concept("c", children=("d",)),
            concept("d"),
        ]
    )
    assert tree.expand("a", {"d"}) == ["d"]


@pytest.mark.parametrize(
    ("term", "trained"),
    [
        ("kidney", {"left kidney", "right kidney"}),
        ("kidney", {"left kidney"}),
        ("lung", LOBES),
        ("vertebrae", {"vertebrae", "l1 vertebra"}),
        ("cerebellum", {"left cerebellar cortex", "left cerebellar white matter", "right cerebellum"}),
    ],
)
def test_serving_vocabulary_expands_like_the_tree(tree: KnowledgeTree, term: str, trained: set[str]) -> None:
    assert Vocabulary.load().expand(term, trained) == tree.expand(term, trained)


def test_serving_vocabulary_keeps_free_text_and_unknown_training() -> None:
    vocabulary = Vocabulary.load()
    assert vocabulary.expand("tumour core", {"liver"}) == ["tumour core"]
    assert vocabulary.expand("kidney", None) == ["kidney"]


def test_expand_refuses_an_unknown_term(tree: KnowledgeTree) -> None:
    with pytest.raises(KeyError, match="not a term of the knowledge tree"):
        tree.expand("tumour core", {"liver"})


# --- pairs -----------------------------------------------------------------------------------------


def test_pairs_have_every_kind_and_the_term_first(tree: KnowledgeTree) -> None:
    pairs = tree.pairs()
    assert {pair.kind for pair in pairs} == set(PAIR_KINDS)
    assert Pair("liver", tree["liver"].definition, "definition") in pairs
    assert Pair("left kidney", "left renal", "synonym") in pairs
    assert Pair("left kidney", "a kind of kidney", "is_a") in pairs
    assert Pair("liver", "part of the digestive system", "part_of") in pairs
    assert all(pair.anchor in tree for pair in pairs)
    assert len(pairs) == len(set(pairs)) > 1500


# --- consistency checks ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("concepts", "message"),
    [
        ([concept("kidney", children=("left kidney",))], "are not terms: left kidney"),
        ([concept("liver", is_a=("liver",))], "unknown terms or itself: liver"),
        ([concept("a", children=("b",)), concept("b", children=("a",))], "children form a cycle"),
        ([concept("Liver")], "must be written as normalize_prompt gives it"),
        ([concept("liver", sources=("wikipedia",))], "sources must be"),
        ([concept("liver", modalities=("xray",))], "modalities must be among"),
        (
            [concept("kidney", children=("left kidney",), modalities=("ct", "mri")), concept("left kidney")],
            "children's",
        ),
        ([concept("kidney", children=("left kidney",), modalities=()), concept("left kidney")], "children's"),
    ],
)
def test_inconsistent_trees_are_refused(concepts: list[Concept], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        KnowledgeTree(concepts)


def test_a_spelling_naming_two_concepts_is_refused() -> None:
    with pytest.raises(SatInputError, match='"organ" names both'):
        KnowledgeTree([concept("liver", synonyms=("organ",)), concept("spleen", synonyms=("organ",))])


def test_unsorted_or_malformed_files_are_refused(tmp_path: Path) -> None:
    lines = KNOWLEDGE_FILE.read_text("utf-8").splitlines()
    unsorted = tmp_path / "unsorted.jsonl"
    unsorted.write_text("\n".join([lines[1], lines[0], *lines[2:]]))
    with pytest.raises(ValueError, match="sorted by term"):
        KnowledgeTree.load(unsorted)
    missing = tmp_path / "missing.jsonl"
    entry = json.loads(lines[0])
    del entry["definition"]
    missing.write_text(json.dumps(entry))
    with pytest.raises(ValueError, match=r"missing\.jsonl:1: expected an object with the keys"):
        KnowledgeTree.load(missing)
    written_false = tmp_path / "false.jsonl"
    written_false.write_text(json.dumps({**json.loads(lines[0]), "single_component": False}))
    with pytest.raises(ValueError, match="written only where it is true"):
        KnowledgeTree.load(written_false)


def test_single_body_structures_reach_the_vocabulary(tree: KnowledgeTree) -> None:
    vocabulary = Vocabulary.load()
    flagged = {concept.term for concept in tree.concepts if concept.single_component}
    assert {"liver", "spleen", "left kidney", "right kidney", "l3 vertebra", "brainstem"} <= flagged
    # Parents of two parts and structures often seen in pieces are never flagged.
    assert not flagged & {"kidney", "lung", "small bowel", "colon", "thalamus", "left kidney cyst"}
    assert not any(tree[term].children for term in flagged)
    assert {term.name for term in vocabulary.terms if term.single_component} == flagged


# --- the vocabulary built from the tree ------------------------------------------------------------


def test_packaged_vocabulary_is_in_sync_with_the_tree(tree: KnowledgeTree) -> None:
    assert PACKAGED_VOCABULARY.read_text("utf-8") == format_vocabulary(vocabulary_document(tree)), (
        "run: python -m satseg_training.knowledge.build_vocabulary"
    )
    assert main(["--check"]) == 0


def test_vocabulary_holds_the_segmentable_concepts(tree: KnowledgeTree) -> None:
    vocabulary = Vocabulary.load()
    assert [term.name for term in vocabulary.terms] == [c.term for c in tree.concepts if c.modalities]
    entries = {entry["term"]: entry for entry in json.loads(PACKAGED_VOCABULARY.read_text())["terms"]}
    assert entries["kidney"]["source"] == "satseg"
    assert entries["left hippocampus"]["source"] == "synthseg+aal116"
    assert "children" not in entries["liver"]


def test_build_writes_and_checks_a_vocabulary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "vocabulary.json"
    assert main(["--output", str(output), "--check"]) == 1
    assert main(["--output", str(output)]) == 0
    assert main(["--output", str(output), "--check"]) == 0
    assert Vocabulary.load(output).sha256 == Vocabulary.load().sha256
    assert "out of date" in capsys.readouterr().out


def test_vocabulary_children_are_checked_and_hashed(tmp_path: Path) -> None:
    kidney = {"term": "kidney", "children": ["left kidney"], "modalities": ["ct"]}
    left = {"term": "left kidney", "modalities": ["ct"]}
    path = tmp_path / "v.json"
    path.write_text(json.dumps({"version": 1, "terms": [kidney, left]}))
    vocabulary = Vocabulary.load(path)
    assert vocabulary.children_of("Kidney") == ("left kidney",)
    assert vocabulary.children_of("left kidney") == ()
    flat = Vocabulary([Term("kidney", (), ("ct",), None), Term("left kidney", (), ("ct",), None)])
    assert flat.sha256 != vocabulary.sha256
    path.write_text(json.dumps({"version": 1, "terms": [kidney]}))
    with pytest.raises(SatInputError, match='children of "kidney" are not terms: left kidney'):
        Vocabulary.load(path)
    path.write_text(json.dumps({"version": 1, "terms": [{**kidney, "children": "left kidney"}, left]}))
    with pytest.raises(SatInputError, match='"children" of "kidney" must be a list of strings'):
        Vocabulary.load(path)
