"""Inspectors for the notebooks: pure render functions, and thin ipywidgets wiring around them.

The render functions return numpy arrays and strings, so the tests call them directly; the
``build_*`` functions only lay out controls and call a render function when a control moves.
"""

from __future__ import annotations

import io

import numpy as np

from minildm.config import ShapesConfig
from minildm.data.shapes import CATEGORIES, GRID, render_item

# distinct outline colours for the objects of one scene (RGB in [0, 1])
OVERLAY_COLOURS = np.array([[0.0, 1.0, 1.0], [1.0, 0.0, 1.0], [1.0, 1.0, 1.0]])


def upscale(image: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upscaling (H, W, C) → (H·f, W·f, C): pixels stay visible as pixels."""
    return image.repeat(factor, axis=0).repeat(factor, axis=1)


def overlay_ground_truth(image: np.ndarray, masks: np.ndarray, boxes, factor: int = 8,
                         show_masks: bool = True, show_grid: bool = True) -> np.ndarray:
    """The image upscaled, with each object's mask tinted and its box outlined; (H·f, W·f, 3)."""
    out = upscale(image, factor).copy()
    for k, (mask, box) in enumerate(zip(masks, boxes)):
        colour = OVERLAY_COLOURS[k % len(OVERLAY_COLOURS)]
        if show_masks:
            m = upscale(mask[..., None], factor)[..., 0]
            out[m] = 0.55 * out[m] + 0.45 * colour
        x0, y0, x1, y1 = (v * factor for v in box)
        out[y0:y1, [x0, x1 - 1]] = colour
        out[[y0, y1 - 1], x0:x1] = colour
    if show_grid:
        side = out.shape[0]
        for k in range(1, GRID):
            line = int(round(k * side / GRID))
            out[line, :] = 0.5 * out[line, :] + 0.5
            out[:, line] = 0.5 * out[:, line] + 0.5
    return out


def describe_scene(item: dict, reads=None) -> str:
    """Caption, full caption and a ground-truth table (and the judge's reading) as HTML."""
    rows = "".join(
        f"<tr><td>{k}</td><td>{o.shape}</td><td>{o.colour}</td><td>{o.size}</td><td>{o.cell}</td>"
        f"<td>{box}</td></tr>"
        for k, (o, box) in enumerate(zip(item["scene"].objects, item["boxes"])))
    html = (f"<b>category</b> {item['scene'].category}<br><b>caption</b> {item['caption']}<br>"
            f"<b>full caption</b> {item['full_caption']}<br>"
            "<table><tr><th>#</th><th>shape</th><th>colour</th><th>size</th><th>cell</th><th>box</th></tr>"
            f"{rows}</table>")
    if reads is not None:
        found = ", ".join(f"{o.size} {o.colour} {o.shape} @ {o.cell} ({o.confidence:.2f})" for o in reads)
        html += f"<b>the judge reads</b> {found or 'nothing'}"
    return html


def render_scene_view(seed: int, index: int, image_size: int = 32, show_masks: bool = True,
                      show_grid: bool = True, judge=None) -> tuple[np.ndarray, str]:
    """One scene of the world as the browser shows it: (overlay image, HTML description)."""
    item = render_item(seed, index, ShapesConfig(image_size=image_size))
    factor = max(1, 256 // image_size)
    picture = overlay_ground_truth(item["image"], item["masks"], item["boxes"], factor, show_masks, show_grid)
    reads = None
    if judge is not None:
        from minildm.data.datasets import to_tensor

        reads = judge.read(to_tensor(item["image"])[None])[0]
    return picture, describe_scene(item, reads)


def to_png(image: np.ndarray) -> bytes:
    """(H, W, 3) float in [0, 1] → PNG bytes for an ``ipywidgets.Image``."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def build_scene_browser(seed: int = 0, image_size: int = 32, judge=None):
    """A scene browser: seed, index, masks and grid toggles → picture and ground truth."""
    import ipywidgets as widgets

    seed_box = widgets.IntText(value=seed, description="seed")
    index = widgets.IntSlider(value=0, min=0, max=999, description="item", continuous_update=False)
    masks = widgets.Checkbox(value=True, description="masks")
    grid = widgets.Checkbox(value=True, description="grid")
    picture = widgets.Image(format="png", width=256, height=256)
    text = widgets.HTML()

    def update(_change=None):
        image, html = render_scene_view(seed_box.value, index.value, image_size, masks.value, grid.value, judge)
        picture.value, text.value = to_png(image), html

    for control in (seed_box, index, masks, grid):
        control.observe(update, names="value")
    update()
    panel = widgets.VBox([widgets.HBox([seed_box, index, masks, grid]), widgets.HBox([picture, text])])
    panel.controls = {"seed": seed_box, "index": index, "masks": masks, "grid": grid,
                      "picture": picture, "text": text}
    return panel


def category_examples(seed: int = 0, per_category: int = 4, image_size: int = 32):
    """A few items of each category: (images (N, H, W, 3), captions) for a grid figure."""
    chosen, found = [], {c: 0 for c in CATEGORIES}  # chosen: (category rank, image, caption)
    index = 0
    while min(found.values()) < per_category:
        item = render_item(seed, index, ShapesConfig(image_size=image_size))
        category = item["scene"].category
        if found[category] < per_category:
            found[category] += 1
            chosen.append((CATEGORIES.index(category), item["image"], item["caption"]))
        index += 1
    chosen.sort(key=lambda t: t[0])
    return np.stack([t[1] for t in chosen]), [t[2] for t in chosen]


# ------------------------------------------------------------------------------------------
# The latent inspector (notebook 01): what lives in the autoencoder's latent space
# ------------------------------------------------------------------------------------------

def _as_image(x) -> np.ndarray:
    from minildm.data.datasets import to_numpy

    return to_numpy(x[0] if x.ndim == 4 else x)


def latent_heatmaps(latent: np.ndarray, size: int) -> np.ndarray:
    """(C, h, w) latent → its channels side by side as one (size, C·size, 3) picture.

    Colour map: blue below zero, red above, white at zero; each channel scaled by its own max.
    """
    panels = []
    for channel in latent:
        scaled = channel / (np.abs(channel).max() + 1e-8)  # [-1, 1]
        rgb = np.stack([1 - np.clip(-scaled, 0, 1), 1 - np.abs(scaled), 1 - np.clip(scaled, 0, 1)], -1)
        panels.append(upscale(rgb, size // channel.shape[0]))
    return np.concatenate(panels, axis=1)


def render_latent_edit(model, image, channel: int, row: int, col: int, delta: float):
    """Encode ``image`` (3, H, W), add ``delta`` to one latent cell, decode.

    Returns ``(original, reconstruction, edited, latent (C, h, w), edited_latent)``; images
    (H, W, 3) in [0, 1]. The edit is in scaled latent units (about one std per unit).
    """
    import torch

    with torch.no_grad():
        latent = model.encode(image[None])
        edited_latent = latent.clone()
        edited_latent[0, channel, row, col] += delta
        reconstruction = model.decode(latent).clamp(-1, 1)
        edited = model.decode(edited_latent).clamp(-1, 1)
    return (_as_image(image), _as_image(reconstruction), _as_image(edited),
            latent[0].numpy(), edited_latent[0].numpy())


def render_interpolation(model, image_a, image_b, steps: int = 7) -> np.ndarray:
    """Decode (1 − t)·z_a + t·z_b for t in [0, 1]: (steps, H, W, 3)."""
    import torch

    with torch.no_grad():
        za, zb = model.encode(image_a[None]), model.encode(image_b[None])
        ts = torch.linspace(0, 1, steps)[:, None, None, None]
        decoded = model.decode((1 - ts) * za + ts * zb).clamp(-1, 1)
    return _as_image(decoded) if steps == 1 else np.stack([_as_image(d) for d in decoded])


def build_latent_inspector(model, seed: int = 0):
    """Pick an item; see its latent channels; nudge one latent cell; interpolate to another item."""
    import ipywidgets as widgets

    from minildm.data.datasets import to_tensor

    size = model.cfg.image_size
    latent_side = size // model.factor

    def image_of(index):
        return to_tensor(render_item(seed, index, ShapesConfig(image_size=size))["image"])

    item = widgets.IntSlider(value=0, min=0, max=999, description="item", continuous_update=False)
    channel = widgets.IntSlider(value=0, min=0, max=model.cfg.z_channels - 1, description="channel")
    row = widgets.IntSlider(value=latent_side // 2, min=0, max=latent_side - 1, description="row")
    col = widgets.IntSlider(value=latent_side // 2, min=0, max=latent_side - 1, description="col")
    delta = widgets.FloatSlider(value=3.0, min=-6.0, max=6.0, step=0.5, description="delta", continuous_update=False)
    partner = widgets.IntSlider(value=1, min=0, max=999, description="to item", continuous_update=False)
    pictures = widgets.Image(format="png")
    channels = widgets.Image(format="png")
    strip = widgets.Image(format="png")
    caption = widgets.HTML()

    def update(_change=None):
        image = image_of(item.value)
        original, reconstruction, edited, latent, _ = render_latent_edit(
            model, image, channel.value, row.value, col.value, delta.value)
        factor = 256 // size
        difference = np.clip(np.abs(edited - reconstruction) * 4, 0, 1)
        pictures.value = to_png(np.concatenate([upscale(p, factor // 2 or 1) for p in
                                                (original, reconstruction, edited, difference)], axis=1))
        channels.value = to_png(latent_heatmaps(latent, 96))
        strip.value = to_png(np.concatenate([upscale(p, factor // 2 or 1)
                                             for p in render_interpolation(model, image, image_of(partner.value))], axis=1))
        caption.value = ("original · reconstruction · edited · |difference|×4 — latent channels below — "
                         f"then item {item.value} → item {partner.value} in latent space")

    for control in (item, channel, row, col, delta, partner):
        control.observe(update, names="value")
    update()
    panel = widgets.VBox([widgets.HBox([item, partner]), widgets.HBox([channel, row, col, delta]),
                          caption, pictures, channels, strip])
    panel.controls = {"item": item, "channel": channel, "row": row, "col": col, "delta": delta,
                      "partner": partner, "pictures": pictures, "channels": channels, "strip": strip}
    return panel


# ------------------------------------------------------------------------------------------
# The caption explorer (notebook 02): what the tiny CLIP makes of a caption
# ------------------------------------------------------------------------------------------

def caption_ranking(encoder, caption: str, images, top: int = 6):
    """Cosine similarity of ``caption`` to each image and the ``top`` best: (scores, order).
    An unknown word raises :class:`minildm.errors.UserError` naming it."""
    import torch

    with torch.no_grad():
        scores = encoder.similarity([caption], images)[0].numpy()
    return scores, np.argsort(-scores)[:top]


def text_attention(encoder, caption: str, layer: int, head: int) -> tuple[np.ndarray, list[str]]:
    """The text tower's attention weights (L, L) at ``layer``/``head`` for ``caption``, and its
    tokens. Rows attend to columns; CLIP's text tower is causal, so each word sees only its past
    — which is why the pooled embedding is read at ``<eos>``, the one token that sees them all."""
    import torch

    with torch.no_grad():
        encoding = encoder.encode_text([caption], output_attentions=True)
    tokens = encoder.tokenizer.convert_ids_to_tokens(encoding.input_ids[0].tolist())
    return encoding.attentions[layer][0, head].float().numpy(), tokens


def _figure_png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def render_caption_view(encoder, caption: str, images, layer: int = 0, head: int = 0, top: int = 6):
    """(PNG of the best-matching images with their similarity, PNG of the attention map, HTML).
    An unknown word gives no pictures and the error line as the HTML."""
    import matplotlib.pyplot as plt

    from minildm.data.datasets import to_numpy
    from minildm.errors import UserError

    try:
        scores, order = caption_ranking(encoder, caption, images, top)
        weights, tokens = text_attention(encoder, caption, layer, head)
    except UserError as error:
        return None, None, f"<span style='color:#b00'>{error}</span>"
    fig, axes = plt.subplots(1, len(order), figsize=(1.6 * len(order), 1.9))
    for ax, k in zip(np.atleast_1d(axes), order):
        ax.imshow(to_numpy(images[k]), interpolation="nearest")
        ax.set_title(f"#{k}  {scores[k]:.2f}", fontsize=8)
        ax.axis("off")
    ranking = _figure_png(fig)
    fig, ax = plt.subplots(figsize=(0.35 * len(tokens) + 1.5, 0.35 * len(tokens) + 1))
    ax.imshow(weights, cmap="magma", vmin=0, vmax=1)
    ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=8)
    ax.set_yticks(range(len(tokens)), tokens, fontsize=8)
    ax.set_title(f"text tower, layer {layer}, head {head}", fontsize=9)
    attention = _figure_png(fig)
    html = (f"<b>{caption}</b>: best match #{order[0]} (similarity {scores[order[0]]:.3f}); "
            f"mean over the {len(scores)} images {scores.mean():.3f}")
    return ranking, attention, html


def build_caption_explorer(encoder, images, caption: str = "a red circle to the left of a blue square"):
    """Type a caption; see which images it matches best and how the text tower attends over it."""
    import ipywidgets as widgets

    config = encoder.clip.config.text_config
    text = widgets.Text(value=caption, description="caption", continuous_update=False,
                        layout=widgets.Layout(width="60%"))
    layer = widgets.IntSlider(value=config.num_hidden_layers - 1, min=0, max=config.num_hidden_layers - 1, description="layer")
    head = widgets.IntSlider(value=0, min=0, max=config.num_attention_heads - 1, description="head")
    ranking, attention = widgets.Image(format="png"), widgets.Image(format="png")
    message = widgets.HTML()

    def update(_change=None):
        ranking_png, attention_png, html = render_caption_view(encoder, text.value, images, layer.value, head.value)
        message.value = html
        if ranking_png is not None:
            ranking.value, attention.value = ranking_png, attention_png

    for control in (text, layer, head):
        control.observe(update, names="value")
    update()
    panel = widgets.VBox([text, widgets.HBox([layer, head]), message, ranking, attention])
    panel.controls = {"caption": text, "layer": layer, "head": head, "ranking": ranking,
                      "attention": attention, "message": message}
    return panel


# ------------------------------------------------------------------------------------------
# Sampling inspectors (notebook 03): the trajectory of a sample, and its cross-attention maps
# ------------------------------------------------------------------------------------------

def sampling_trajectory(pipeline, prompt: str, steps: int = 50, guidance: float = 3.0, seed: int = 0,
                        record_attention: bool = True) -> dict:
    """Sample one image and keep every step: ``timesteps``, ``x_t`` and ``x0`` (the sample's space),
    ``decoded_x0`` (images of the predicted x0 at each step), the final ``image``, and (when asked)
    cross-attention ``maps``: {layer: (steps, heads, H·W, L)} for the conditional half of the batch,
    with the prompt's ``tokens``."""
    import torch

    from minildm.attention import AttentionStore, install_hook

    timesteps, xs, x0s = [], [], []

    def keep(i, t, x_t, x0):
        timesteps.append(int(t)), xs.append(x_t[0].cpu()), x0s.append(x0[0].cpu())

    store = AttentionStore() if record_attention else None
    install_hook(pipeline.unet, store)
    try:
        final = pipeline.sample_latents([prompt], steps=steps, guidance=guidance, seed=seed, callback=keep)
    finally:
        install_hook(pipeline.unet, None)
    with torch.no_grad():
        decoded = pipeline.decode(torch.stack(x0s)).cpu()
        image = pipeline.decode(final).cpu()[0]
    out = {"timesteps": timesteps, "x_t": torch.stack(xs), "x0": torch.stack(x0s), "decoded_x0": decoded, "image": image}
    if store is not None:
        conditional = 1 if guidance != 1.0 else 0  # guided batches are [unconditional, conditional]
        out["maps"] = {name: torch.stack([m[conditional] for m in calls]) for name, calls in store.maps.items()}
        ids = pipeline.encoder.tokenize(prompt)["input_ids"][0].tolist()
        out["tokens"] = pipeline.encoder.tokenizer.convert_ids_to_tokens(ids)
    return out


def latent_preview(x) -> np.ndarray:
    """A (C, h, w) latent (or a 3-channel image) as a picture: its first three channels,
    each scaled to [0, 1]."""
    x = x[:3].float()
    lo, hi = x.amin(dim=(1, 2), keepdim=True), x.amax(dim=(1, 2), keepdim=True)
    return ((x - lo) / (hi - lo + 1e-8)).permute(1, 2, 0).numpy()


def attention_overlay(image: np.ndarray, attention: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """An attention map (h, w) over an image (H, W, 3): upsampled to the image, normalised to
    [0, 1], drawn in red over a greyed image."""
    factor = image.shape[0] // attention.shape[0]
    heat = attention.repeat(factor, 0).repeat(factor, 1)
    heat = (heat - heat.min()) / (heat.max() - heat.min() + 1e-8)
    grey = image.mean(-1, keepdims=True).repeat(3, -1)
    red = np.zeros_like(image)
    red[..., 0] = 1.0
    return (1 - alpha * heat[..., None]) * grey + alpha * heat[..., None] * red


def render_trajectory_step(trajectory: dict, step: int, size: int = 128) -> np.ndarray:
    """x_t, predicted x0 (in the sample's space) and the decoded predicted x0 at ``step``,
    side by side, each upscaled to ``size``."""
    from minildm.data.datasets import to_numpy

    panels = [latent_preview(trajectory["x_t"][step]), latent_preview(trajectory["x0"][step]),
              to_numpy(trajectory["decoded_x0"][step])]
    return np.concatenate([upscale(p, size // p.shape[0]) for p in panels], axis=1)


def render_attention(trajectory: dict, layer: str, token: int, step: int, size: int = 128) -> np.ndarray:
    """The cross-attention of ``layer`` at ``step`` to ``token`` (mean over heads), over the final image."""
    from minildm.data.datasets import to_numpy

    maps = trajectory["maps"][layer][step].mean(0)  # (H·W, L)
    side = int(round(maps.shape[0] ** 0.5))
    image = upscale(to_numpy(trajectory["image"]), size // trajectory["image"].shape[-1])
    return attention_overlay(image, maps[:, token].reshape(side, side).numpy())


def build_sampling_inspector(pipeline, prompt: str = "a red circle to the left of a blue square",
                             steps: int = 50, guidance: float = 3.0, seed: int = 0):
    """Scrub through the sampling steps of one prompt (x_t · predicted x0 · its decoding), and view
    the cross-attention to a chosen token in a chosen layer at that step."""
    import ipywidgets as widgets

    state = {"trajectory": sampling_trajectory(pipeline, prompt, steps, guidance, seed)}
    layers = sorted(state["trajectory"]["maps"])
    text = widgets.Text(value=prompt, description="prompt", continuous_update=False, layout=widgets.Layout(width="60%"))
    seed_box = widgets.IntText(value=seed, description="seed")
    step = widgets.IntSlider(value=steps - 1, min=0, max=steps - 1, description="step", continuous_update=False)
    layer = widgets.Dropdown(options=layers, value=layers[0], description="layer")
    token = widgets.Dropdown(description="token")
    trajectory_picture, attention_picture = widgets.Image(format="png"), widgets.Image(format="png")
    message = widgets.HTML()

    def refresh_tokens():
        tokens = state["trajectory"]["tokens"]
        token.options = [(f"{k}: {t}", k) for k, t in enumerate(tokens)]
        token.value = min(2, len(tokens) - 1)

    def draw(_change=None):
        trajectory = state["trajectory"]
        trajectory_picture.value = to_png(render_trajectory_step(trajectory, step.value))
        attention_picture.value = to_png(render_attention(trajectory, layer.value, token.value, step.value))
        message.value = (f"step {step.value + 1}/{steps}, t = {trajectory['timesteps'][step.value]}: "
                         "x_t · predicted x₀ · its decoding — and the cross-attention to the chosen token")

    def resample(_change=None):
        from minildm.errors import UserError

        try:
            state["trajectory"] = sampling_trajectory(pipeline, text.value, steps, guidance, seed_box.value)
        except UserError as error:
            message.value = f"<span style='color:#b00'>{error}</span>"
            return
        refresh_tokens()
        draw()

    refresh_tokens()
    for control in (step, layer, token):
        control.observe(draw, names="value")
    text.observe(resample, names="value")
    seed_box.observe(resample, names="value")
    draw()
    panel = widgets.VBox([widgets.HBox([text, seed_box]), widgets.HBox([step, layer, token]), message,
                          widgets.HBox([trajectory_picture, attention_picture])])
    panel.controls = {"prompt": text, "seed": seed_box, "step": step, "layer": layer, "token": token,
                      "trajectory": trajectory_picture, "attention": attention_picture, "message": message}
    return panel


def student_steps(student, prompt: str, steps: int, seed: int = 0) -> list[np.ndarray]:
    """The ADD student's x̂₀ after each of its ``steps`` sampling steps, decoded (H, W, 3) in [0, 1]."""
    predictions = []
    student([prompt], steps=steps, guidance=1.0, seed=seed,
            callback=lambda i, t, x, x0: predictions.append(x0.clone()))
    return [_as_image(student.decode(x0)[0]) for x0 in predictions]


def render_student_view(student, teacher, prompt: str, steps: int, seed: int = 0, size: int = 128) -> np.ndarray:
    """One row: the student's x̂₀ after each of its steps, then the teacher's 50 guided DDIM steps
    from the same noise, with a white gap before the teacher."""
    from minildm.data.datasets import to_numpy

    tiles = [upscale(image, size // image.shape[0]) for image in student_steps(student, prompt, steps, seed)]
    teacher_image = to_numpy(teacher([prompt], seed=seed)[0])
    gap = np.ones((size, size // 8, 3))
    return np.concatenate(tiles + [gap, upscale(teacher_image, size // teacher_image.shape[0])], axis=1)


def build_student_explorer(student, teacher, prompt: str = "a red circle to the left of a blue square", seed: int = 0):
    """Type a prompt, pick 1–4 student steps and a seed: the student's x̂₀ after each step, and the
    teacher's 50-step image from the same noise (the last tile)."""
    import ipywidgets as widgets

    text = widgets.Text(value=prompt, description="prompt", continuous_update=False, layout=widgets.Layout(width="60%"))
    steps = widgets.ToggleButtons(options=[1, 2, 4], value=1, description="steps")
    seed_box = widgets.IntText(value=seed, description="seed")
    picture, message = widgets.Image(format="png"), widgets.HTML()

    def draw(_change=None):
        from minildm.errors import UserError

        try:
            picture.value = to_png(render_student_view(student, teacher, text.value, steps.value, seed_box.value))
        except UserError as error:
            message.value = f"<span style='color:#b00'>{error}</span>"
            return
        message.value = (f"the student's x̂₀ after each of its {steps.value} step(s), no guidance · "
                         f"last: the teacher, 50 guided DDIM steps")

    for control in (text, steps, seed_box):
        control.observe(draw, names="value")
    draw()
    panel = widgets.VBox([widgets.HBox([text, seed_box]), steps, message, picture])
    panel.controls = {"prompt": text, "steps": steps, "seed": seed_box, "picture": picture, "message": message}
    return panel
