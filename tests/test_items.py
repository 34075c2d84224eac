"""The training items: encoded once, kept in a run's folder, reused only when they are the same items."""

import pytest
import torch

from minildm.stages import ae as ae_stage
from minildm.stages.items import ITEMS, ItemCache, item_cache, weights_digest


@pytest.fixture(scope="module")
def autoencoder():
    return ae_stage.load(None)[0]


class CountingEncoder:
    """An autoencoder stand-in that counts the images it encodes (and has the real one's weights)."""

    def __init__(self, autoencoder):
        self.autoencoder, self.encoded = autoencoder, 0

    def encode(self, images):
        self.encoded += images.shape[0]
        return self.autoencoder.encode(images)

    def state_dict(self):
        return self.autoencoder.state_dict()


def test_the_captions_are_the_same_whether_or_not_the_items_are_rendered():
    rendered = ItemCache(12, 3, 32, embed_images=lambda images: images.flatten(1)[:, :4])
    scenes_only = ItemCache(12, 3, 32)
    assert rendered.category == scenes_only.category and rendered.full == scenes_only.full
    assert rendered.image_embeddings.shape == (12, 4) and scenes_only.latents is None


def test_a_run_keeps_its_latents_and_the_next_run_reads_them_instead_of_encoding(autoencoder, tmp_path):
    counting = CountingEncoder(autoencoder)
    first = item_cache(20, 0, 32, counting, (tmp_path / "ldm",))
    assert counting.encoded == 20 and (tmp_path / "ldm" / ITEMS).is_file()
    again = CountingEncoder(autoencoder)
    # a later run looks in its own folder first (nothing there), then in the run it builds on
    fewer = item_cache(8, 0, 32, again, (tmp_path / "experts", tmp_path / "ldm"))
    assert again.encoded == 0, "the latents were read, not encoded"
    assert torch.equal(fewer.latents, first.latents[:8]) and fewer.full == first.full[:8]
    assert not (tmp_path / "experts" / ITEMS).exists(), "nothing new to keep"
    encoded_here = ItemCache(8, 0, 32, autoencoder)
    assert torch.equal(encoded_here.latents, fewer.latents), "the first items are encoded the same in any run"


@pytest.mark.parametrize("change", ["more items", "another stream", "other weights"])
def test_other_items_or_another_autoencoder_are_encoded_again(autoencoder, tmp_path, change):
    item_cache(8, 0, 32, autoencoder, (tmp_path,))
    size, seed, model = 8, 0, autoencoder
    if change == "more items":
        size = 9
    elif change == "another stream":
        seed = 1
    elif change == "other weights":
        model = ae_stage.load(None)[0]
        with torch.no_grad():
            next(model.parameters()).add_(1e-3)
        assert weights_digest(model) != weights_digest(autoencoder)
    counting = CountingEncoder(model)
    item_cache(size, seed, 32, counting, (tmp_path / "other", tmp_path))
    assert counting.encoded == size


def test_a_damaged_items_file_is_encoded_again(autoencoder, tmp_path):
    (tmp_path / ITEMS).write_bytes(b"not a safetensors file")
    counting = CountingEncoder(autoencoder)
    cache = item_cache(4, 0, 32, counting, (tmp_path,))
    assert counting.encoded == 4 and cache.latents.shape[0] == 4
    assert item_cache(4, 0, 32, CountingEncoder(autoencoder), (tmp_path,)).latents.equal(cache.latents)


def test_pixel_space_keeps_nothing(tmp_path):
    cache = item_cache(4, 0, 32, None, (tmp_path,))
    assert cache.latents is None and not (tmp_path / ITEMS).exists()


def test_the_items_are_encoded_on_the_gpu_when_there_is_one_and_the_autoencoder_stays_put(autoencoder, monkeypatch):
    from minildm.stages import items

    here = ItemCache(6, 2, 32, autoencoder)
    images, _ = items.shapes_batch(2, range(6), items.ShapesConfig(image_size=32))
    with torch.no_grad():
        assert torch.equal(here.latents, autoencoder.encode(images).float())
    assert here.latents.device.type == "cpu" and next(autoencoder.parameters()).device.type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert items.encoding_device() == torch.device("cuda", 1), "each torchrun rank encodes on its own GPU"
    monkeypatch.delenv("LOCAL_RANK")
    assert items.encoding_device() == torch.device("cuda", 0)
