"""The tokenizer and the tiny CLIP: framing, unknown words, shapes, padding, learning, offline I/O."""

import numpy as np
import pytest
import torch

from minildm.config import ClipConfig, get_profile
from minildm.data.captions import category_caption, full_caption, vocabulary
from minildm.data.datasets import shapes_batch
from minildm.data.shapes import make_scene
from minildm.encoders import build_tokenizer, known_words, tiny_encoder, tokenize
from minildm.errors import UserError

SMALL = get_profile("smoke").clip


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_every_caption_round_trips_framed_by_bos_and_eos(tokenizer):
    captions = [f(make_scene(5, i)) for i in range(300) for f in (full_caption, category_caption)]
    batch = tokenize(tokenizer, captions)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape[1] <= ClipConfig().max_length, "the longest caption fits the text tower"
    for row, m, caption in zip(ids, mask, captions):
        real = row[m.bool()].tolist()
        assert real[0] == tokenizer.bos_token_id and real[-1] == tokenizer.eos_token_id
        assert real.count(tokenizer.eos_token_id) == 1 and tokenizer.unk_token_id not in real
        assert (row[~m.bool()] == tokenizer.pad_token_id).all()
        assert tokenizer.decode(real, skip_special_tokens=True) == caption
        assert len(real) == len(caption.split()) + 2, "one token per word"


def test_vocabulary_is_the_grammar_plus_four_special_tokens(tokenizer):
    assert known_words(tokenizer) == vocabulary()
    assert [tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id] == [0, 1, 2, 3]
    assert tokenize(tokenizer, "A RED Circle")["input_ids"].tolist() == tokenize(tokenizer, "a red circle")["input_ids"].tolist()


def test_an_unknown_word_is_an_error_naming_it_and_the_closest_words(tokenizer):
    with pytest.raises(UserError) as info:
        tokenize(tokenizer, ["a red circle", "a crimson circel"])
    message = str(info.value)
    assert "'crimson'" in message and "\n" not in message
    with pytest.raises(UserError, match="closest known words: circle"):
        tokenize(tokenizer, ["a red circel"])
    # a hub tokenizer has no unknown words; check=False passes text through untouched
    assert tokenizer.unk_token_id in tokenize(tokenizer, ["a crimson circle"], check=False)["input_ids"][0].tolist()


def test_encoder_output_shapes_and_the_pooled_token_is_eos():
    encoder = tiny_encoder(SMALL).eval()
    images, scenes = shapes_batch(0, range(3))
    captions = [full_caption(s) for s in scenes]
    with torch.no_grad():
        text = encoder.encode_text(captions)
        image = encoder.encode_image(images)
    length = text.input_ids.shape[1]
    assert text.tokens.shape == (3, length, SMALL.text_width)
    assert text.pooled.shape == (3, SMALL.projection_dim) == image.shape
    assert encoder.token_dim == SMALL.text_width and encoder.pooled_dim == SMALL.projection_dim
    eos = (text.input_ids == encoder.tokenizer.eos_token_id).int().argmax(1)
    expected = encoder.clip.text_projection(text.tokens[torch.arange(3), eos])
    torch.testing.assert_close(text.pooled, expected)


def test_padding_changes_nothing():
    encoder = tiny_encoder(SMALL).eval()
    with torch.no_grad():
        alone = encoder.encode_text(["a red circle"])
        padded = encoder.encode_text(["a red circle", "a small red circle at the top left and a large blue square in the center"])
    torch.testing.assert_close(padded.pooled[:1], alone.pooled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded.tokens[:1, :5], alone.tokens, atol=1e-5, rtol=1e-5)


def test_eager_attention_returns_the_maps():
    encoder = tiny_encoder(SMALL, attention="eager").eval()
    with torch.no_grad():
        text = encoder.encode_text(["a red circle above a blue square"], output_attentions=True)
    maps = text.attentions
    assert len(maps) == SMALL.text_layers and maps[0].shape == (1, SMALL.heads, 9, 9)
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(1, SMALL.heads, 9))
    assert maps[0][0, :, 0, 1:].abs().max() == 0, "causal: <bos> attends to itself only"


def test_a_few_steps_lower_the_contrastive_loss():
    torch.manual_seed(0)
    encoder = tiny_encoder(SMALL)
    images, scenes = shapes_batch(0, range(16))
    batch = encoder.tokenize([full_caption(s) for s in scenes])
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = encoder(batch["input_ids"], batch["attention_mask"], images).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    # a fresh CLIP knows nothing: no better than chance, ln(batch) (worse when its random logits are
    # confident: with the smoke profile's 64-wide text tower the first loss is about 4.3)
    assert losses[0] > np.log(16) - 0.3, "a fresh CLIP is no better than chance: ln(batch)"
    assert losses[-1] < 0.6 * losses[0]


def test_save_and_load_offline_with_the_transformers_api(tmp_path, monkeypatch):
    from transformers import AutoTokenizer, CLIPModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    encoder = tiny_encoder(SMALL).eval()
    encoder.tokenizer.save_pretrained(tmp_path)
    encoder.clip.save_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    clip = CLIPModel.from_pretrained(tmp_path).eval()
    caption = ["two green crosses"]
    assert tokenizer(caption)["input_ids"] == encoder.tokenizer(caption)["input_ids"]
    ids = torch.tensor(tokenizer(caption)["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(clip.text_model(ids).pooler_output, encoder.clip.text_model(ids).pooler_output)


def test_a_hub_encoder_offline_is_one_clear_error(monkeypatch):
    from minildm.encoders import load_hub_encoder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as info:
        load_hub_encoder("openai/clip-vit-base-patch32")
    assert "cannot load the text encoder 'openai/clip-vit-base-patch32'" in str(info.value)
    assert "\n" not in str(info.value)
