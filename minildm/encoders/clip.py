"""The tiny CLIP: ``transformers.CLIPModel`` from a small config, and the one interface that every
later stage calls to turn captions and images into conditioning.

CLIP (Radford et al. 2021) trains a text tower and an image tower so that a caption and its image
land on nearby unit vectors. For a batch of N pairs it computes the N×N cosine similarities
``s_ij = <t_i, v_j>·exp(τ)`` and applies a cross-entropy in both directions with the diagonal as
the right answer (``CLIPModel(..., return_loss=True)``; τ is learned, initialised at ln(1/0.07)).

What the diffusion stages take from it (:class:`TextImageEncoder`):

* ``encode_text(captions).tokens`` — per-token hidden states (B, L, D) of the text tower's last
  layer: the **context of cross-attention** in LDM's UNet (and the T5/CLIP-text token streams
  of eDiff-I). One vector per word, so the UNet can attend to "red" and "circle" separately.
* ``encode_text(captions).pooled`` — one projected vector per caption (the hidden state at
  ``<eos>``, through the text projection): the embedding that retrieval uses and that eDiff-I
  adds to the timestep embedding. One vector per caption, so which word said what is mixed.
* ``encode_image(images)`` — the projected image embedding (ADD's discriminator's image
  projection; eDiff-I's CLIP-image condition, which the course widens with the vision tower's
  patch tokens: :func:`minildm.multi_embedding.image_condition`).

Scale: OpenAI's ViT-B/32 CLIP has 151 M parameters trained on 400 M pairs; this one has a few
hundred thousand trained on shapes-world pairs for minutes, on 32 px images in 4×4 patches. The
classes and the interface are the real ones, so :func:`load_hub_encoder` can put a pretrained
CLIP behind the same interface for a learner who is online.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from minildm.config import ClipConfig
from minildm.encoders.tokenizer import build_tokenizer, tokenize
from minildm.errors import UserError


def clip_config(cfg: ClipConfig, tokenizer):
    """The ``transformers.CLIPConfig`` of a tiny CLIP over ``tokenizer``'s vocabulary."""
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    text = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.text_width, intermediate_size=4 * cfg.text_width,
        num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.heads,
        max_position_embeddings=cfg.max_length, hidden_act="gelu",
        # the pooled text embedding is read at the first <eos>: these must be our ids
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id)
    vision = CLIPVisionConfig(
        image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_size=cfg.vision_width,
        intermediate_size=4 * cfg.vision_width, num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.heads, hidden_act="gelu")
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                      projection_dim=cfg.projection_dim)


def build_clip(cfg: ClipConfig, tokenizer, attention: str = "sdpa"):
    """A freshly initialised ``CLIPModel`` (no download). ``attention="eager"`` computes the
    softmax weights explicitly, so ``output_attentions=True`` returns them (the notebook's maps);
    "sdpa" is faster and returns none."""
    from transformers import CLIPModel

    return CLIPModel._from_config(clip_config(cfg, tokenizer), attn_implementation=attention)


@dataclass
class TextEncoding:
    """What :meth:`TextImageEncoder.encode_text` returns for a batch of B captions."""

    input_ids: torch.Tensor  # (B, L) token ids, <bos> … <eos> then <pad>
    attention_mask: torch.Tensor  # (B, L) 1 for real tokens, 0 for padding
    tokens: torch.Tensor  # (B, L, D) per-token embeddings: cross-attention's keys and values
    pooled: torch.Tensor  # (B, P) one projected embedding per caption (not normalised)


class TextImageEncoder(torch.nn.Module):
    """A CLIP model and its tokenizer behind the interface the diffusion stages use.

    ``pixel_mean``/``pixel_std``/``image_size``: how images in [-1, 1] are brought to what the
    vision tower was trained on (the tiny CLIP takes them as they are; a hub CLIP wants 224 px and
    its own normalisation). ``check_words``: refuse words outside a word-level vocabulary.
    """

    def __init__(self, clip, tokenizer, *, image_size: int | None = None, pixel_mean=None,
                 pixel_std=None, check_words: bool = True, name: str = "tiny-clip", text_model=None):
        super().__init__()
        self.clip, self.tokenizer, self.check_words, self.name = clip, tokenizer, check_words, name
        # the text tower encode_text runs: CLIP's own, or one fine-tuned with a UNet (stage 3),
        # held in a list so that it is not registered twice in the state dict
        self._text_override = [text_model] if text_model is not None else []
        self.image_size = image_size or clip.config.vision_config.image_size
        mean = torch.tensor(pixel_mean if pixel_mean is not None else [0.5] * 3).view(1, 3, 1, 1)
        std = torch.tensor(pixel_std if pixel_std is not None else [0.5] * 3).view(1, 3, 1, 1)
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)

    @property
    def text_model(self):
        return self._text_override[0] if self._text_override else self.clip.text_model

    @property
    def token_dim(self) -> int:
        return self.clip.config.text_config.hidden_size

    @property
    def pooled_dim(self) -> int:
        return self.clip.config.projection_dim

    @property
    def device(self) -> torch.device:
        return self.clip.logit_scale.device

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, images: torch.Tensor):
        """CLIP's training forward: ``.loss`` is the symmetric contrastive loss of the batch
        (text i belongs with image i), ``.logits_per_text`` the (B, B) scaled similarities."""
        return self.clip(input_ids=input_ids, attention_mask=attention_mask,
                         pixel_values=self.pixel_values(images), return_loss=True)

    def with_text_model(self, text_model) -> "TextImageEncoder":
        """The same encoder with another text tower (e.g. one fine-tuned jointly with a UNet)."""
        return TextImageEncoder(self.clip, self.tokenizer, image_size=self.image_size,
                                pixel_mean=self.pixel_mean.flatten().tolist(), pixel_std=self.pixel_std.flatten().tolist(),
                                check_words=self.check_words, name=self.name, text_model=text_model)

    def tokenize(self, captions: list[str] | str, fixed_length: bool = False) -> dict:
        return tokenize(self.tokenizer, captions, check=self.check_words, fixed_length=fixed_length)

    def encode_text(self, captions: list[str] | str, output_attentions: bool = False) -> TextEncoding:
        """Per-token and pooled embeddings of ``captions`` (unknown words: one clear error)."""
        batch = {k: v.to(self.device) for k, v in self.tokenize(captions).items()}
        out = self.text_model(**batch, output_attentions=output_attentions)
        encoding = TextEncoding(batch["input_ids"], batch["attention_mask"], out.last_hidden_state,
                                self.clip.text_projection(out.pooler_output))
        if output_attentions:
            encoding.attentions = out.attentions  # per layer: (B, heads, L, L)
        return encoding

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] → the vision tower's input."""
        x = (images.to(self.device).float() + 1) / 2
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False)
        return (x - self.pixel_mean) / self.pixel_std

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """The projected image embedding (B, P) (not normalised)."""
        return self.encode_image_and_patches(images)[0]

    def encode_image_and_patches(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass of the vision tower: the projected image embedding (B, P) and the last layer's
        patch tokens (B, N, W), the class token left out."""
        out = self.clip.vision_model(pixel_values=self.pixel_values(images))
        return self.clip.visual_projection(out.pooler_output), out.last_hidden_state[:, 1:]

    def similarity(self, captions: list[str], images: torch.Tensor) -> torch.Tensor:
        """Cosine similarities (captions × images) — CLIP's logits before the temperature."""
        text = F.normalize(self.encode_text(captions).pooled.float(), dim=-1)
        image = F.normalize(self.encode_image(images).float(), dim=-1)
        return text @ image.T


def tiny_encoder(cfg: ClipConfig, words: list[str] | None = None, attention: str = "sdpa") -> TextImageEncoder:
    """A freshly initialised tiny CLIP over ``words`` (default: the caption grammar)."""
    tokenizer = build_tokenizer(words, max_length=cfg.max_length)
    return TextImageEncoder(build_clip(cfg, tokenizer, attention), tokenizer)


def load_hub_encoder(model_id: str, attention: str = "sdpa") -> TextImageEncoder:
    """A pretrained CLIP from the Hugging Face hub (``openai/clip-vit-base-patch32``, …) behind the
    same interface — for a learner who is online. Offline it fails with one line."""
    from transformers import AutoTokenizer, CLIPModel
    from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    try:
        clip = CLIPModel.from_pretrained(model_id, attn_implementation=attention)
        tokenizer = AutoTokenizer.from_pretrained(model_id)
    except OSError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"cannot load the text encoder {model_id!r} from the Hugging Face hub "
                        f"(offline, or no such model?): {first} Offline, use the course's own "
                        "tiny CLIP (leave the option out, or give a run folder of `minildm train clip`)") from None
    return TextImageEncoder(clip, tokenizer, pixel_mean=OPENAI_CLIP_MEAN, pixel_std=OPENAI_CLIP_STD,
                            check_words=False, name=model_id)
