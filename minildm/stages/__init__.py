"""The course's stages, in order, and which of them this version of minildm has built.

Each built stage is a module with ``train(profile, out, ...) -> card`` and
``load(path) -> (model, card)`` and ``evaluate(model, n) -> dict``. The command line and the
course runner go through :func:`stage_module`, so a stage that is not built yet answers with one
clear line instead of a traceback.
"""

from __future__ import annotations

import importlib

from minildm.errors import UserError

TRAIN_STAGES = ("judge", "ae", "clip", "ldm", "pixel", "experts", "add")
EVAL_STAGES = TRAIN_STAGES + ("paint",)
BUILT = ("judge", "ae", "clip", "ldm", "pixel", "experts", "paint", "add")
BASED_STAGES = ("experts", "add")  # start from a trained LDM: ``minildm train STAGE --base RUN``
# The earlier runs a stage builds on (default: the references), ``minildm train STAGE --PART RUN``:
# the judge's features in the autoencoder's perceptual loss; the autoencoder and the text encoder
# of the diffusion models. The course passes its own runs, so that it is trained from scratch.
UPSTREAM = {"ae": ("judge",), "ldm": ("autoencoder", "encoder"), "pixel": ("encoder",)}


def stage_module(name: str, accepted: tuple[str, ...] = TRAIN_STAGES):
    """The module of a built stage; a UserError for an unknown or not yet built one."""
    if name not in accepted:
        raise UserError(f"unknown stage {name!r}; stages: {' '.join(accepted)}")
    if name not in BUILT:
        raise UserError(f"stage {name!r} is not built yet in this version of minildm; "
                        f"built stages: {' '.join(BUILT)}")
    return importlib.import_module(f"minildm.stages.{name}")
