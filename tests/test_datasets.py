import json

import numpy as np
import pytest
import torch

from minildm.config import ShapesConfig
from minildm.data.datasets import (ShapesDataset, collate, load_image_dataset, shapes_batch,
                                   to_hf_dataset, to_numpy)
from minildm.data.shapes import render_item
from minildm.errors import UserError


def test_torch_dataset_items_and_collate():
    ds = ShapesDataset(10, seed=0)
    item = ds[3]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert -1 <= item["image"].min() and item["image"].max() <= 1
    assert np.allclose(to_numpy(item["image"]), render_item(0, 3)["image"], atol=1e-6)
    batch = collate([ds[i] for i in range(4)])
    assert batch["image"].shape == (4, 3, 32, 32) and len(batch["caption"]) == 4
    with pytest.raises(IndexError):
        ds[10]
    loader = torch.utils.data.DataLoader(ds, batch_size=5, collate_fn=collate)
    assert [b["image"].shape[0] for b in loader] == [5, 5]


def test_shapes_batch_matches_dataset():
    images, scenes = shapes_batch(0, [2, 7], ShapesConfig())
    assert torch.equal(images[1], ShapesDataset(10)[7]["image"]) and scenes[0].index == 2


def test_hf_dataset_round_trip_with_ground_truth(tmp_path):
    import datasets

    ds = to_hf_dataset(6, seed=0)
    assert isinstance(ds.features["image"], datasets.Image)
    ds.save_to_disk(str(tmp_path / "saved"))
    back = datasets.load_from_disk(str(tmp_path / "saved"))
    row, item = back[4], render_item(0, 4)
    assert row["text"] == item["caption"] and row["full_caption"] == item["full_caption"]
    assert np.array_equal(np.asarray(row["objects"][0]["mask"], bool), item["masks"][0])
    assert np.abs(np.asarray(row["image"], np.float32) / 255 - item["image"]).max() <= 0.5 / 255 + 1e-6
    loaded = load_image_dataset(str(tmp_path / "saved"), image_size=32)
    assert len(loaded) == 6 and loaded[0]["caption"] == render_item(0, 0)["caption"]


def test_local_image_folder_with_metadata(tmp_path):
    from PIL import Image

    rows = []
    for i in range(3):
        Image.fromarray(np.full((40, 48, 3), 60 * i, np.uint8)).save(tmp_path / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"picture {i}"})
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    ds = load_image_dataset(str(tmp_path), image_size=32)
    assert len(ds) == 3
    item = ds[2]
    assert item["image"].shape == (3, 32, 32)
    assert item["caption"] in {"picture 0", "picture 1", "picture 2"}


def test_bad_data_specs_are_one_clear_line(tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        load_image_dataset(str(tmp_path / "missing"), 32)
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(UserError, match="no metadata.jsonl"):
        load_image_dataset(str(tmp_path), 32)
    with pytest.raises(UserError, match="not a folder"):
        load_image_dataset(str(tmp_path / "a.png"), 32)


def test_a_broken_folder_is_one_clear_line_before_training(tmp_path):
    """Each of these used to train until the step that first drew the file, then stop with a
    traceback from pyarrow or PIL."""
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "good.png")
    metadata = tmp_path / "metadata.jsonl"
    metadata.write_text('{"file_name": "good.png", "text": "a red circle"}\nnot json\n')
    with pytest.raises(UserError, match="could not read it as images with captions .*one JSON object per line"):
        load_image_dataset(str(tmp_path), 32)
    metadata.write_text('{"file_name": "good.png", "text": "a red circle"}\n{"file_name": "gone.png", "text": "x"}\n')
    with pytest.raises(UserError, match="cannot read the image gone.png .*No such file"):
        load_image_dataset(str(tmp_path), 32)
    (tmp_path / "gone.png").write_text("not a picture")
    with pytest.raises(UserError, match="cannot read the image gone.png"):
        load_image_dataset(str(tmp_path), 32)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "gone.png")
    assert len(load_image_dataset(str(tmp_path), 32)) == 2, "once the file is an image, the folder loads"


def test_hub_offline_is_one_clear_line(monkeypatch):
    # conftest sets HF_HUB_OFFLINE=1; the hub path exists and fails with one line
    with pytest.raises(UserError) as info:
        load_image_dataset("hub:nobody/no-such-dataset", 32)
    message = str(info.value)
    assert message.startswith("--data hub:nobody/no-such-dataset: could not load it") and "\n" not in message
