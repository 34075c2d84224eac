"""What paint-with-words paints beyond eDiff-I's formula: the recipes (:mod:`minildm.paint`'s
docstring says why), and the guidance scale painting is measured at.

Kept apart from :mod:`minildm.paint` (which needs torch) so that the command line can list the
recipes without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from minildm.errors import UserError


@dataclass(frozen=True)
class PaintRecipe:
    """Which columns of A are painted beyond the phrases' own (:mod:`minildm.paint`'s docstring)."""

    background: bool = False  # <bos> = 1 − the union of the regions
    summary: bool = False  # <eos> = the union of the regions
    outside: float = 0.0  # a phrase's tokens: A = −outside where the phrase is not painted
    carry: bool = False  # the words between two painted phrases ("and a") painted as the phrase before them


RECIPES = {"paper": PaintRecipe(), "bos": PaintRecipe(background=True),
           "bos+eos": PaintRecipe(background=True, summary=True),
           "full": PaintRecipe(background=True, summary=True, outside=1.0),
           "full+carry": PaintRecipe(background=True, summary=True, outside=1.0, carry=True)}
DEFAULT_RECIPE = "full+carry"  # the best on the reference LDM (data/measurements/paint.json, notebook 05)
PAINT_GUIDANCE = 7.5  # the guidance scale painting is measured at (the reference code's, Stable Diffusion's)


def as_recipe(recipe: PaintRecipe | str) -> PaintRecipe:
    """A recipe, or the name of one of ``RECIPES``."""
    if isinstance(recipe, PaintRecipe):
        return recipe
    if recipe not in RECIPES:
        raise UserError(f"paint recipe {recipe!r}: choose one of {', '.join(RECIPES)}")
    return RECIPES[recipe]
