"""The caption grammar of the shapes world: scene → caption, and caption → clauses.

Two kinds of caption describe a scene:

* the **category caption**, in the style of one of GenEval's six categories, at toy scale::

    single_object  "a small red circle"
    two_object     "a small circle and a large square"
    counting       "two green triangles"
    colors         "a red circle"
    position       "a red circle to the left of a blue square"
    color_attr     "a red circle and a blue square"

* the **full caption**, naming every object with size, colour, shape and grid cell::

    "a small red circle at the top left and a large blue square at the bottom right"

:func:`parse` reads either back into :class:`Clauses` — one :class:`ObjectClause` per noun
phrase and at most one relation — which :func:`minildm.metrics.clauses_hold` checks against the
objects a judge reads from an image. The grammar::

    caption  := phrase (" and " phrase)*  |  phrase " " RELATION " " phrase
    phrase   := COUNT [SIZE] [COLOUR] SHAPE[s] [WHERE]
    COUNT    := a | an | one | two | three
    RELATION := to the left of | to the right of | above | below
    WHERE    := at the top left | at the top | ... | in the center | ... | at the bottom right
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass

from minildm.data.shapes import COLOURS, GRID, SHAPES, SIZES, Scene
from minildm.errors import UserError

COUNT_WORDS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3}
NUMBER_NAMES = {2: "two", 3: "three"}
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
SINGULARS = {plural: shape for shape, plural in PLURALS.items()}
RELATIONS = ("to the left of", "to the right of", "above", "below")
CELL_PHRASES = (
    "at the top left", "at the top", "at the top right",
    "at the left", "in the center", "at the right",
    "at the bottom left", "at the bottom", "at the bottom right",
)


@dataclass(frozen=True)
class ObjectClause:
    """One noun phrase: ``count`` objects of ``shape``, with the attributes the phrase names."""

    count: int
    shape: str
    colour: str | None = None
    size: str | None = None
    cell: int | None = None
    exact: bool = False  # an explicit number ("two circles") asks for exactly that many


@dataclass(frozen=True)
class Clauses:
    objects: tuple[ObjectClause, ...]
    relation: str | None = None  # between objects[0] and objects[1]

    def to_dict(self) -> dict:
        return {"objects": [asdict(o) for o in self.objects], "relation": self.relation}

    @classmethod
    def from_dict(cls, d: dict) -> "Clauses":
        return cls(tuple(ObjectClause(**o) for o in d["objects"]), d.get("relation"))


def vocabulary() -> list[str]:
    """Every word the grammar can produce, in a fixed order."""
    words = list(COUNT_WORDS) + list(SIZES) + list(COLOURS) + list(SHAPES) + list(PLURALS.values())
    words += ["and"]
    for phrase in RELATIONS + CELL_PHRASES:
        words += phrase.split()
    return list(dict.fromkeys(words))


# ------------------------------------------------------------------------------------------
# scene → caption
# ------------------------------------------------------------------------------------------

def _article(next_word: str) -> str:
    return "an" if next_word[0] in "aeiou" else "a"


def _phrase(*words: str) -> str:
    words = [w for w in words if w]
    return " ".join([_article(words[0])] + words)


def relation_between(cell_a: int, cell_b: int) -> str | None:
    """Where cell a lies relative to cell b: the dominant axis decides; diagonals have none."""
    dx = cell_a % GRID - cell_b % GRID
    dy = cell_a // GRID - cell_b // GRID
    if abs(dx) > abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    if abs(dy) > abs(dx):
        return "above" if dy < 0 else "below"
    return None


def full_caption(scene: Scene) -> str:
    """Every object with size, colour, shape and cell, in reading order."""
    ordered = sorted(scene.objects, key=lambda o: o.cell)
    return " and ".join(_phrase(o.size, o.colour, o.shape, CELL_PHRASES[o.cell]) for o in ordered)


def category_caption(scene: Scene) -> str:
    """The caption in the style of the scene's category (the objects it was drawn for)."""
    objs, cat = scene.objects, scene.category
    if cat == "single_object":
        return _phrase(objs[0].size, objs[0].colour, objs[0].shape)
    if cat == "colors":
        return _phrase(objs[0].colour, objs[0].shape)
    if cat == "two_object":
        return f"{_phrase(objs[0].size, objs[0].shape)} and {_phrase(objs[1].size, objs[1].shape)}"
    if cat == "color_attr":
        return f"{_phrase(objs[0].colour, objs[0].shape)} and {_phrase(objs[1].colour, objs[1].shape)}"
    if cat == "position":
        relation = relation_between(objs[0].cell, objs[1].cell)
        return f"{_phrase(objs[0].colour, objs[0].shape)} {relation} {_phrase(objs[1].colour, objs[1].shape)}"
    if cat == "counting":
        first = objs[0]
        count = sum(o.shape == first.shape and o.colour == first.colour for o in objs)
        return f"{NUMBER_NAMES[count]} {first.colour} {PLURALS[first.shape]}"
    raise ValueError(f"unknown category {cat!r}")


# ------------------------------------------------------------------------------------------
# caption → clauses
# ------------------------------------------------------------------------------------------

def check_words(text: str) -> None:
    """Raise a clear error for any word outside the grammar, naming the closest known words."""
    known = set(vocabulary())
    for word in text.lower().split():
        if word not in known:
            close = difflib.get_close_matches(word, sorted(known), n=3, cutoff=0.5)
            hint = f"; closest known words: {', '.join(close)}" if close else ""
            raise UserError(f"unknown word {word!r} in {text!r}{hint}. Known words: {' '.join(vocabulary())}")


def _parse_phrase(text: str, caption: str) -> ObjectClause:
    cell = None
    for k, where in enumerate(CELL_PHRASES):
        if text.endswith(" " + where):
            # the longest match wins ("at the top left" before "at the top")
            if cell is None or len(where) > len(CELL_PHRASES[cell]):
                cell = k
    if cell is not None:
        text = text[: -len(CELL_PHRASES[cell]) - 1]
    words = text.split()
    if len(words) < 2 or words[0] not in COUNT_WORDS:
        raise UserError(f"cannot parse {text!r} in {caption!r}: a phrase starts with a, an, one, two or three")
    count, rest = COUNT_WORDS[words[0]], words[1:]
    size = rest.pop(0) if rest and rest[0] in SIZES else None
    colour = rest.pop(0) if rest and rest[0] in COLOURS else None
    if len(rest) != 1 or (rest[0] not in SHAPES and rest[0] not in SINGULARS):
        raise UserError(f"cannot parse {text!r} in {caption!r}: expected [size] [colour] shape, shapes: {', '.join(SHAPES)}")
    shape = SINGULARS.get(rest[0], rest[0])
    if (count > 1) != (rest[0] in SINGULARS):
        raise UserError(f"cannot parse {text!r} in {caption!r}: the number and the noun disagree")
    return ObjectClause(count, shape, colour, size, cell, exact=words[0] in ("two", "three"))


def parse(caption: str) -> Clauses:
    """Read a caption back into clauses; an unknown word or phrase is a clear error."""
    text = " ".join(caption.lower().split())
    check_words(text)
    for relation in RELATIONS:
        marker = f" {relation} "
        if marker in text:
            left, right = text.split(marker, 1)
            return Clauses((_parse_phrase(left, caption), _parse_phrase(right, caption)), relation)
    return Clauses(tuple(_parse_phrase(p, caption) for p in text.split(" and ")))


def ground_truth_clauses(scene: Scene) -> list[tuple[str, str, str, int]]:
    """The scene's objects as (shape, colour, size, cell), sorted — what a full caption names."""
    return sorted(o.describe() for o in scene.objects)
