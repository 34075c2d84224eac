"""Datasets: the shapes world as a torch ``Dataset`` and a Hugging Face ``datasets.Dataset``,
and one loader for every source a learner can name with ``--data``:

==========================  ==============================================================
``shapes``                  the embedded default: procedural, infinite, offline
a folder with images and    Hugging Face ``imagefolder`` layout, captions in a ``text`` or
``metadata.jsonl``          ``caption`` column of metadata.jsonl (``file_name`` per row)
a folder saved by           ``datasets.Dataset.save_to_disk`` (has ``state.json`` or
``save_to_disk``            ``dataset_dict.json``)
``hub:OWNER/NAME``          a dataset on the Hugging Face hub, for a learner who is online
==========================  ==============================================================

Every image leaves this module as a float tensor (3, H, W) in [-1, 1].
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from minildm.config import ShapesConfig
from minildm.data.shapes import Scene, render_item
from minildm.errors import UserError

DATA_SPEC_HELP = ("'shapes', a folder of images with metadata.jsonl captions, a folder written by "
                  "datasets' save_to_disk, or hub:OWNER/NAME")


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) float in [0, 1] → (3, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float() * 2 - 1


def to_numpy(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) or (3, H, W) in [-1, 1] → (…, H, W, 3) float in [0, 1] for plotting."""
    x = (images.detach().float().cpu().clamp(-1, 1) + 1) / 2
    return x.movedim(-3, -1).numpy()


def shapes_batch(seed: int, indices: Iterable[int], cfg: ShapesConfig = ShapesConfig()
                 ) -> tuple[torch.Tensor, list[Scene]]:
    """Items ``indices`` of stream ``seed`` as images (B, 3, H, W) in [-1, 1] and their scenes."""
    items = [render_item(seed, int(i), cfg) for i in indices]
    return torch.stack([to_tensor(it["image"]) for it in items]), [it["scene"] for it in items]


def render_scenes(scenes: Iterable[Scene], supersample: int = 4) -> torch.Tensor:
    """Any scenes (made, or edited: a shape twin, a single object) as images (B, 3, H, W) in [-1, 1]."""
    from minildm.data.shapes import render

    return torch.stack([to_tensor(render(scene, supersample)[0]) for scene in scenes])


class ShapesDataset(torch.utils.data.Dataset):
    """``n`` items of the shapes world as a torch Dataset (any ``n``: items are computed, not stored).

    Each item: ``image`` (3, H, W) in [-1, 1], ``caption`` (category style), ``full_caption``,
    ``masks`` (n_objects, H, W) bool and ``scene`` (the ground truth).
    """

    def __init__(self, n: int, seed: int = 0, cfg: ShapesConfig = ShapesConfig()):
        self.n, self.seed, self.cfg = n, seed, cfg

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.n:
            raise IndexError(index)
        item = render_item(self.seed, index, self.cfg)
        return {"image": to_tensor(item["image"]), "caption": item["caption"],
                "full_caption": item["full_caption"], "masks": torch.from_numpy(item["masks"]),
                "scene": item["scene"]}


def collate(items: list[dict]) -> dict:
    """Stack images; keep captions, masks and scenes as lists (objects per scene vary)."""
    return {"image": torch.stack([it["image"] for it in items]),
            **{k: [it[k] for it in items] for k in items[0] if k != "image"}}


# ------------------------------------------------------------------------------------------
# Hugging Face datasets
# ------------------------------------------------------------------------------------------

def _objects_record(item: dict) -> list[dict]:
    return [{"shape": o.shape, "colour": o.colour, "size": o.size, "cell": o.cell,
             "box": list(box), "mask": mask.astype(np.uint8).tolist()}
            for o, box, mask in zip(item["scene"].objects, item["boxes"], item["masks"])]


def to_hf_dataset(n: int, seed: int = 0, cfg: ShapesConfig = ShapesConfig()):
    """The first ``n`` items as a ``datasets.Dataset``: Image feature, captions, ground truth."""
    import datasets
    from PIL import Image

    features = datasets.Features({
        "image": datasets.Image(),
        "text": datasets.Value("string"),
        "full_caption": datasets.Value("string"),
        "category": datasets.Value("string"),
        "objects": datasets.List({
            "shape": datasets.Value("string"), "colour": datasets.Value("string"),
            "size": datasets.Value("string"), "cell": datasets.Value("int32"),
            "box": datasets.List(datasets.Value("int32")),
            "mask": datasets.List(datasets.List(datasets.Value("uint8"))),
        }),
    })
    rows = {"image": [], "text": [], "full_caption": [], "category": [], "objects": []}
    for i in range(n):
        item = render_item(seed, i, cfg)
        rows["image"].append(Image.fromarray((item["image"] * 255).round().astype(np.uint8)))
        rows["text"].append(item["caption"])
        rows["full_caption"].append(item["full_caption"])
        rows["category"].append(item["scene"].category)
        rows["objects"].append(_objects_record(item))
    return datasets.Dataset.from_dict(rows, features=features)


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Any ``datasets.Dataset`` with an image column and a caption column, resized to ``image_size``."""

    CAPTION_COLUMNS = ("text", "caption", "captions", "prompt")

    def __init__(self, hf_dataset, image_size: int, source: str):
        self.data, self.image_size = hf_dataset, image_size
        columns = hf_dataset.column_names
        if "image" not in columns:
            raise UserError(f"--data {source}: no 'image' column (columns: {', '.join(columns)})")
        self.caption_column = next((c for c in self.CAPTION_COLUMNS if c in columns), None)
        if self.caption_column is None:
            raise UserError(f"--data {source}: no caption column; expected one of "
                            f"{', '.join(self.CAPTION_COLUMNS)} (e.g. 'text' in metadata.jsonl)")

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict:
        from PIL import Image

        row = self.data[index]
        image = row["image"].convert("RGB")
        if image.size != (self.image_size, self.image_size):
            side = min(image.size)  # centre crop to a square, then resize
            left, top = (image.width - side) // 2, (image.height - side) // 2
            image = image.crop((left, top, left + side, top + side))
            image = image.resize((self.image_size, self.image_size), Image.BICUBIC)
        caption = row[self.caption_column]
        if isinstance(caption, list):
            caption = caption[0]
        return {"image": to_tensor(np.asarray(image, dtype=np.float32) / 255), "caption": caption}


def load_image_dataset(spec: str, image_size: int, n: int = 10_000, seed: int = 0):
    """The dataset named by ``--data SPEC`` (see the module docstring); a clear error otherwise."""
    if spec == "shapes":
        return ShapesDataset(n, seed, ShapesConfig(image_size=image_size))
    import datasets  # only for the learner's own images: the shapes world needs no more than torch

    if spec.startswith("hub:"):
        return ImageCaptionDataset(_load_hub(spec[4:]), image_size, spec)
    path = Path(spec)
    if not path.exists():
        raise UserError(f"--data {spec}: no such folder; --data accepts {DATA_SPEC_HELP}")
    if not path.is_dir():
        raise UserError(f"--data {spec}: not a folder; --data accepts {DATA_SPEC_HELP}")
    example = json.dumps({"file_name": "0001.png", "text": "a red circle"})
    if (path / "state.json").exists() or (path / "dataset_dict.json").exists():
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    else:
        if not any(path.rglob("metadata.jsonl")) and not any(path.rglob("metadata.csv")):
            raise UserError(f"--data {spec}: no metadata.jsonl with captions in this folder; "
                            f"write one line per image: {example}")
        try:
            ds = datasets.load_dataset("imagefolder", data_dir=str(path), split="train")
        except Exception as error:  # noqa: BLE001 - a folder datasets cannot read is the learner's to fix
            raise UserError(f"--data {spec}: could not read it as images with captions ({_first_line(error)}); "
                            f"metadata.jsonl needs one JSON object per line, like {example}") from None
    dataset = ImageCaptionDataset(ds, image_size, spec)
    _check_images(ds, spec)
    return dataset


def _check_images(ds, spec: str) -> None:
    """Open every image of a learner's own dataset once, before training, so that a missing or
    broken file is one clear line now rather than a traceback at the step that first draws it."""
    import io

    import datasets
    from PIL import Image

    for row in ds.cast_column("image", datasets.Image(decode=False)).select_columns(["image"]):  # row by row
        row = row["image"]
        name = row.get("path") or "an image stored in the dataset"
        try:
            with Image.open(io.BytesIO(row["bytes"]) if row.get("bytes") else row["path"]) as image:
                image.verify()
        except Exception as error:  # noqa: BLE001 - PIL raises several kinds for a file it cannot read
            raise UserError(f"--data {spec}: cannot read the image {Path(name).name} ({_first_line(error)}); "
                            "every file_name in metadata.jsonl must be an image in the folder") from None


def _first_line(error: Exception) -> str:
    """An exception's message, its first line and at most 200 characters."""
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:200]


def _load_hub(hub_id: str):
    """A hub dataset's train split; offline (or unknown id) is one clear line, not a traceback."""
    import datasets

    try:
        return datasets.load_dataset(hub_id, split="train")
    except Exception as error:  # noqa: BLE001 - any failure to fetch becomes one clear line
        raise UserError(f"--data hub:{hub_id}: could not load it from the Hugging Face hub "
                        f"(offline, or no such dataset?): {_first_line(error)}") from None
