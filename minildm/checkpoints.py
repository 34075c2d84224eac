"""Saving and loading weights: safetensors plus a JSON card, never pickle, never half-written.

A *checkpoint* is a folder holding ``model.safetensors`` (the weights) and ``card.json`` (how they
were made: config, command, seed, loss curve, metrics). A training run's folder is one too, so
every ``--model`` flag accepts a run folder, a checkpoint folder or the ``model.safetensors`` file.

Crash safety: a file is written next to its final name and moved over it with ``os.replace``, which
is atomic on POSIX and Windows; a folder is written whole into a sibling temporary folder and
swapped in (keeping the previous one as ``NAME.old`` until the new one is in place). A crash at any
moment leaves either the old checkpoint or the new one, never a mixture.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from minildm.errors import UserError

WEIGHTS = "model.safetensors"
CARD = "card.json"


# ---------------------------------------------------------------------------------------- writing
def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` to a safetensors file (contiguous CPU copies, so tied weights are fine),
    with ``metadata`` (strings) in its header beside ``format``."""
    plain = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in tensors.items()}
    save_file(plain, str(path), metadata={"format": "pt", **(metadata or {})})


def save_json(path: str | Path, value) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2)
        f.write("\n")


def _fsync(path: Path) -> None:
    """Flush a file (or, on POSIX, a folder's list of names) from the OS cache to the disk."""
    if path.is_dir() and os.name != "posix":
        return  # Windows cannot open a folder to flush it; its renames are journaled anyway
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_file(path: str | Path, write_fn: Callable[[Path], None]) -> None:
    """Call ``write_fn(temp_path)`` and move the finished file over ``path`` in one step."""
    path = Path(path)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    temp = Path(temp)
    try:
        write_fn(temp)
        _fsync(temp)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync(path.parent)


def atomic_write_dir(final_dir: str | Path, write_fn: Callable[[Path], None]) -> None:
    """Call ``write_fn(temp_dir)`` to fill a fresh folder, then swap it in as ``final_dir``.

    Steps: write and fsync everything in ``.NAME.tmp-*``; move an existing ``NAME`` aside to
    ``NAME.old``; rename the temporary folder to ``NAME``; delete ``NAME.old``. If ``write_fn``
    raises, the temporary folder is removed and ``NAME`` is untouched. If the process dies between
    the two renames, only ``NAME.old`` exists, and :func:`existing_dir` finds it there.
    """
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    backup = final_dir.with_name(final_dir.name + ".old")
    temp = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.tmp-", dir=final_dir.parent))
    try:
        write_fn(temp)
        for file in temp.rglob("*"):
            _fsync(file)
        _fsync(temp)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    if final_dir.exists():
        if backup.exists():  # left by an earlier crash after the swap; final_dir is the good copy
            shutil.rmtree(backup)
        os.replace(final_dir, backup)
    os.replace(temp, final_dir)
    _fsync(final_dir.parent)
    shutil.rmtree(backup, ignore_errors=True)


def existing_dir(path: str | Path) -> Path | None:
    """``path`` if it is a folder, else its ``.old`` backup left by an interrupted swap, else None."""
    path = Path(path)
    backup = path.with_name(path.name + ".old")
    for candidate in (path, backup):
        if candidate.is_dir():
            return candidate
    return None


def save_checkpoint(directory: str | Path, tensors: dict[str, torch.Tensor], card: dict) -> None:
    """Write ``directory/model.safetensors`` and ``directory/card.json`` together, atomically."""

    def write(folder: Path) -> None:
        save_tensors(folder / WEIGHTS, tensors)
        save_json(folder / CARD, card)

    atomic_write_dir(directory, write)


# ---------------------------------------------------------------------------------------- reading
def resolve_checkpoint(path: str | Path) -> Path:
    """The folder holding ``model.safetensors`` and ``card.json`` that ``path`` names.

    ``path`` may be a run folder, a checkpoint folder, or the ``model.safetensors`` file itself.
    """
    given = Path(path)
    folder = given.parent if given.suffix == ".safetensors" and given.is_file() else existing_dir(given)
    if folder is None:
        raise UserError(f"no checkpoint at {given}: expected a run directory or a folder holding "
                        f"{WEIGHTS} and {CARD}")
    missing = [name for name in (WEIGHTS, CARD) if not (folder / name).is_file()]
    if missing and (folder / "checkpoint").is_dir():
        raise UserError(f"the run in {given} has not finished: no {' or '.join(missing)} yet; "
                        f"continue it with --resume, or pass {folder / 'checkpoint'}")
    runs_inside = sorted(sub.name for sub in folder.iterdir() if (sub / CARD).is_file()) if missing else []
    if runs_inside:  # a course's folder, say: its runs are one level down
        raise UserError(f"no checkpoint at {given}: it holds the runs {', '.join(runs_inside)}; "
                        f"pass one of them, e.g. {folder / ('ldm' if 'ldm' in runs_inside else runs_inside[0])}")
    if missing:
        raise UserError(f"no checkpoint at {given}: {' and '.join(missing)} missing; expected a run "
                        f"directory or a folder holding {WEIGHTS} and {CARD}")
    return folder


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise UserError(f"cannot read {path}: {error}") from None


def load_json(path: str | Path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"cannot read {path}: {error}") from None


def load_stage_checkpoint(path: str | Path | None, reference: Path, stage: str,
                          what: str) -> tuple[Path, dict[str, torch.Tensor], dict]:
    """``(folder, state_dict, card)`` of a run of ``stage`` (None: the ``reference`` one); a
    checkpoint of another stage is one line saying it is not ``what``."""
    folder = resolve_checkpoint(reference if path is None else path)
    state, card = load_checkpoint(folder)
    if card.get("stage") != stage:
        raise UserError(f"{folder} holds a {card.get('stage')!r} checkpoint, not {what}")
    return folder, state, card


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """``(state_dict, card)`` of the checkpoint that ``path`` names (see :func:`resolve_checkpoint`)."""
    folder = resolve_checkpoint(path)
    return load_tensors(folder / WEIGHTS), load_json(folder / CARD)


def _listing(names: list[str], shown: int = 5) -> str:
    more = f", ... ({len(names) - shown} more)" if len(names) > shown else ""
    return f"({len(names)}) [{', '.join(names[:shown])}{more}]"


def load_state_into(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Strictly load ``state_dict`` into ``model``; a mismatch is a one-line ``UserError``.

    The line names the missing keys, the unexpected keys and the shape mismatches (the first few
    of each, with counts), which is what tells a user that ``source`` came from another config.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
                  for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    problems = [f"{label} {_listing(names)}" for label, names in
                (("missing keys", missing), ("unexpected keys", unexpected),
                 ("shape mismatch (checkpoint vs model)", mismatched)) if names]
    if problems:
        raise UserError(f"checkpoint {source} was made with another config: {'; '.join(problems)}")
    model.load_state_dict(state_dict, strict=True)


def load_trained(model: torch.nn.Module, path: str | Path) -> dict:
    """Load a finished run's (EMA) weights into ``model``; returns the card."""
    state_dict, card = load_checkpoint(path)
    load_state_into(model, state_dict, str(path))
    return card


# ---------------------------------------------------------------------- optimizer state <-> files
def optimizer_state_to_tensors(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``optimizer.state_dict()`` into safetensors-ready tensors and a JSON-able skeleton.

    Tensors are named ``state.<param index>.<name>`` (for AdamW: ``step``, ``exp_avg``,
    ``exp_avg_sq``); the skeleton keeps ``param_groups`` and any non-tensor per-parameter values.
    """
    tensors, plain = {}, {}
    for index, param_state in state_dict["state"].items():
        for name, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{name}"] = value
            else:
                plain.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "plain_state": plain}


def optimizer_state_from_tensors(tensors: dict[str, torch.Tensor], skeleton: dict) -> dict:
    """Inverse of :func:`optimizer_state_to_tensors`: a dict for ``optimizer.load_state_dict``."""
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for index, values in skeleton["plain_state"].items():
        state.setdefault(int(index), {}).update(values)
    # JSON turned tuples such as AdamW's betas into lists; "params" is the one list to keep.
    param_groups = [{key: tuple(value) if isinstance(value, list) and key != "params" else value
                     for key, value in group.items()} for group in skeleton["param_groups"]]
    return {"state": state, "param_groups": param_groups}
