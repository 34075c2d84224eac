"""The diffusion stages' training items: rendered once, encoded once, reused down the chain.

A latent diffusion step trains on the autoencoder's latents of its items, and encoding costs more
than a UNet step on a CPU, so :class:`ItemCache` renders ``size`` items of the training stream
and encodes them once; training then cycles through them in a fresh order each epoch.

Several runs train on the *same* items encoded by the *same* autoencoder: the LDM, then the
eDiff-I experts' tree, their equal-cost baseline and the multi-embedding model fine-tuned from
it, and the ADD student distilled from it (whose 8192 items are the first 8192 of the same
stream). :func:`item_cache` therefore keeps a run's encoded latents in its folder
(``items.safetensors``), and a run looks there — in its own folder (a resumed run) and in the
folder of the run it builds on — before encoding anything. A file is used only when it holds at
least the items asked for, of the same stream and image size, encoded by an autoencoder with
the very same weights (a digest of them is stored beside the latents); otherwise the items are
encoded as before. On one core, the cpu profile's 40 000 items took 125 s to encode and 4 s to
read back with their captions remade (timed by calling :func:`item_cache`; ``minildm bench``
reports the ratio as ``items_read_speedup_over_encoding``).
"""

from __future__ import annotations

import copy
import hashlib
import os
from pathlib import Path

import torch
from safetensors import safe_open

from minildm.checkpoints import atomic_write_file, save_tensors
from minildm.config import ShapesConfig
from minildm.data.captions import category_caption, full_caption
from minildm.data.datasets import shapes_batch
from minildm.data.shapes import make_scene

ITEMS = "items.safetensors"  # a run's encoded training items, beside its checkpoint


class ItemCache:
    """``size`` items of the training stream: their captions, and their latents (latent space;
    encoded once, in batches) or nothing (pixel space: images are re-rendered, which is cheap).

    ``embed_images`` (images → (B, D)) also keeps each item's image embedding (eDiff-I's image
    condition, ADD's discriminator's). ``latents`` (size, z, h, w): these items' latents, read from
    an items file (:func:`item_cache`), so they are not encoded again.

    The autoencoder encodes on ``device`` (default :func:`encoding_device`: this process's GPU
    when there is one), on a copy of it there, so the caller's autoencoder stays where it was; the
    latents are kept on the CPU. The gpu profile's 100 000 items at 64 px would take the CPU a long
    time to encode, and on a GPU machine its CPU is not where the work should go."""

    def __init__(self, size: int, seed: int, image_size: int, autoencoder=None, batch_size: int = 256,
                 embed_images=None, latents: torch.Tensor | None = None, device: str | torch.device | None = None):
        self.size, self.seed, self.image_size = size, seed, image_size
        self.category, self.full, encoded, embeddings = [], [], [], []
        shapes = ShapesConfig(image_size=image_size)
        encode = autoencoder is not None and latents is None
        if encode:
            encoder, device = _encoder_on(autoencoder, device)
        for start in range(0, size, batch_size):
            indices = range(start, min(size, start + batch_size))
            if encode or embed_images is not None:
                images, scenes = shapes_batch(seed, indices, shapes)
            else:  # the captions alone: the scenes, without rendering them
                scenes = [make_scene(seed, i, shapes) for i in indices]
            self.category += [category_caption(s) for s in scenes]
            self.full += [full_caption(s) for s in scenes]
            with torch.no_grad():
                if encode:
                    encoded.append(encoder.encode(images.to(device)).float().cpu())
                if embed_images is not None:
                    embeddings.append(embed_images(images).float())
        if latents is None:
            latents = torch.cat(encoded) if encoded else None
        self.latents = latents
        self.image_embeddings = torch.cat(embeddings) if embeddings else None

    def item_order(self, positions: range) -> list[int]:
        """Cache indices of global positions ``positions``: each epoch a fresh permutation that is
        a pure function of (seed, epoch)."""
        orders, out = {}, []
        for p in positions:
            epoch = p // self.size
            if epoch not in orders:
                orders[epoch] = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch))
            out.append(int(orders[epoch][p % self.size]))
        return out

    def samples(self, indices: list[int]) -> torch.Tensor:
        if self.latents is not None:
            return self.latents[indices]
        return shapes_batch(self.seed, indices, ShapesConfig(image_size=self.image_size))[0]


def _encoder_on(autoencoder, device) -> tuple:
    """The autoencoder on ``device`` (a copy, unless it is there already) and that device; a
    stand-in that is no module encodes where it is, on the CPU."""
    if not isinstance(autoencoder, torch.nn.Module):
        return autoencoder, torch.device("cpu")
    device = torch.device(device) if device is not None else encoding_device()
    if next(autoencoder.parameters()).device == device:
        return autoencoder, device
    return copy.deepcopy(autoencoder).to(device), device


def encoding_device() -> torch.device:
    """Where :class:`ItemCache` encodes: this process's GPU (``LOCAL_RANK``'s under torchrun) when
    CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def weights_digest(module: torch.nn.Module) -> str:
    """A SHA-256 of a module's parameters and buffers (names and bytes): the same digest means
    the same function, so latents it encoded can be reused."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def item_cache(size: int, seed: int, image_size: int, autoencoder, folders=(), embed_images=None) -> ItemCache:
    """:class:`ItemCache` of ``size`` items, with latents read from the first of ``folders`` whose
    items file fits (at least ``size`` items of stream ``seed`` at ``image_size``, encoded by an
    autoencoder with ``autoencoder``'s weights); else encoded now and, if ``folders`` names any,
    saved in ``folders[0]`` (the run's own folder) for a resumed run and the runs built on it.
    Pixel space (no autoencoder) has nothing to store."""
    if autoencoder is None:
        return ItemCache(size, seed, image_size, None, embed_images=embed_images)
    wanted = {"seed": str(seed), "image_size": str(image_size), "autoencoder": weights_digest(autoencoder)}
    for folder in folders:
        latents = _read_items(Path(folder) / ITEMS, wanted, size)
        if latents is not None:
            return ItemCache(size, seed, image_size, autoencoder, embed_images=embed_images, latents=latents)
    cache = ItemCache(size, seed, image_size, autoencoder, embed_images=embed_images)
    if folders:
        path = Path(folders[0]) / ITEMS
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_file(path, lambda temp: save_tensors(temp, {"latents": cache.latents},
                                                          {"size": str(size), **wanted}))
    return cache


def _read_items(path: Path, wanted: dict, size: int) -> torch.Tensor | None:
    """The latents of ``path`` if it matches ``wanted`` and holds at least ``size`` items; None otherwise
    (no file, another stream or autoencoder, too few items, or a file that cannot be read)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if any(metadata.get(key) != value for key, value in wanted.items()) or int(metadata["size"]) < size:
                return None
            return f.get_slice("latents")[:size]
    except Exception:  # noqa: BLE001 — a damaged or foreign file: encode the items again
        return None
