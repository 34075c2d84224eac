"""Text and image encoders: a word-level tokenizer and a tiny CLIP (``transformers`` classes).

:class:`TextImageEncoder` is the interface the diffusion stages call — ``encode_text(captions)``
(per-token and pooled embeddings) and ``encode_image(images)`` — whether it holds the course's
tiny CLIP or, online, a pretrained one from the hub.
"""

from minildm.encoders.clip import TextEncoding, TextImageEncoder, build_clip, load_hub_encoder, tiny_encoder
from minildm.encoders.tokenizer import build_tokenizer, check_known, known_words, tokenize

__all__ = ["TextEncoding", "TextImageEncoder", "build_clip", "load_hub_encoder", "tiny_encoder",
           "build_tokenizer", "check_known", "known_words", "tokenize"]
