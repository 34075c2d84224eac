import pytest

from minildm.data.captions import (Clauses, category_caption, full_caption, ground_truth_clauses,
                                   parse, relation_between, vocabulary)
from minildm.data.shapes import CATEGORIES, make_scene
from minildm.errors import UserError
from minildm.metrics import clauses_hold


def test_full_captions_parse_back_to_exactly_the_ground_truth():
    for i in range(3000):
        scene = make_scene(0, i)
        clauses = parse(full_caption(scene))
        parsed = sorted((c.shape, c.colour, c.size, c.cell) for c in clauses.objects)
        assert parsed == ground_truth_clauses(scene), full_caption(scene)
        assert all(c.count == 1 for c in clauses.objects)


def test_category_captions_hold_on_their_own_scene():
    for i in range(3000):
        scene = make_scene(1, i)
        caption = category_caption(scene)
        assert clauses_hold(parse(caption), scene.objects), (caption, scene.objects)


def test_every_category_appears_with_its_form():
    examples = {}
    for i in range(200):
        scene = make_scene(0, i)
        examples.setdefault(scene.category, category_caption(scene))
    assert set(examples) == set(CATEGORIES)
    assert examples["counting"].split()[0] in ("two", "three")
    assert any(r in examples["position"] for r in ("left of", "right of", "above", "below"))
    assert " and " in examples["color_attr"] and " and " in examples["two_object"]


def test_parse_examples():
    c = parse("two red circles")
    assert c.objects[0].count == 2 and c.objects[0].exact and c.objects[0].colour == "red"
    c = parse("a red circle to the left of a blue square")
    assert c.relation == "to the left of" and [o.shape for o in c.objects] == ["circle", "square"]
    c = parse("a small red circle at the top left and a large blue square at the bottom right")
    assert [o.cell for o in c.objects] == [0, 8]
    c = parse("an orange cross in the center")
    assert c.objects[0].cell == 4 and c.objects[0].colour == "orange"
    assert Clauses.from_dict(c.to_dict()) == c


def test_relations_on_the_grid():
    assert relation_between(0, 2) == "to the left of"
    assert relation_between(5, 3) == "to the right of"
    assert relation_between(1, 7) == "above"
    assert relation_between(7, 1) == "below"
    assert relation_between(0, 4) is None  # diagonal: no relation holds


def test_unknown_word_is_a_clear_error_naming_close_words():
    with pytest.raises(UserError, match="unknown word 'crimson'"):
        parse("a crimson circle")
    with pytest.raises(UserError, match="closest known words: circle"):
        parse("a red circel")


def test_malformed_phrases_are_clear_errors():
    with pytest.raises(UserError, match="number and the noun disagree"):
        parse("two red circle")
    with pytest.raises(UserError, match="cannot parse"):
        parse("red circle")


def test_vocabulary_is_small_and_complete():
    words = vocabulary()
    assert len(words) == len(set(words)) and len(words) < 60
    for i in range(300):
        scene = make_scene(2, i)
        assert set(full_caption(scene).split()) <= set(words)
        assert set(category_caption(scene).split()) <= set(words)
