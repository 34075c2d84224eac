"""A word-level tokenizer for the caption grammar, as a real ``transformers`` tokenizer.

Built with 🤗 ``tokenizers`` (a ``WordLevel`` model: one id per whole word) and wrapped as a
``PreTrainedTokenizerFast``, so it has the interface of every tokenizer on the hub
(``tokenizer(captions, padding=True, return_tensors="pt")``, ``save_pretrained``,
``AutoTokenizer.from_pretrained``) and a learner can swap in CLIP's BPE tokenizer unchanged.

Why word-level: the shapes world's captions use fewer than 50 words, so each token is a word a
learner can read, and an attention map over tokens is an attention map over words. A real CLIP
uses byte-pair encoding over 49,408 sub-words; LDM's BERT used WordPiece — the idea (text → ids,
framed by start and end markers, padded to a batch) is the same.

Every sequence is framed ``<bos> … <eos>``: CLIP's text tower pools the hidden state at the first
``<eos>`` (its "pooled" text embedding), so ``<eos>`` must be there. Ids: ``<pad>`` 0, ``<unk>`` 1,
``<bos>`` 2, ``<eos>`` 3, then the words.

An unknown word is an error naming it and the closest known words — never a silent ``<unk>``:
a learner who types "crimson circle" must learn what the model knows.
"""

from __future__ import annotations

import difflib

from minildm.errors import UserError

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)


def caption_vocabulary() -> list[str]:
    """The caption grammar's words (:func:`minildm.data.captions.vocabulary`)."""
    from minildm.data.captions import vocabulary

    return vocabulary()


def build_tokenizer(words: list[str] | None = None, max_length: int = 40):
    """A ``PreTrainedTokenizerFast`` over ``words`` (default: the caption grammar's) plus the four
    special tokens. Text is lower-cased and split on whitespace and punctuation."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = caption_vocabulary() if words is None else list(dict.fromkeys(words))
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *words])}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, unk_token=UNK,
                                   bos_token=BOS, eos_token=EOS, model_max_length=max_length)


def known_words(tokenizer) -> list[str]:
    """The tokenizer's words, special tokens left out, in id order."""
    vocab = tokenizer.get_vocab()
    return [w for w in sorted(vocab, key=vocab.get) if w not in tokenizer.all_special_tokens]


def check_known(tokenizer, captions: list[str]) -> None:
    """Raise a :class:`UserError` naming the first word of ``captions`` outside the vocabulary,
    with the closest known words."""
    vocab = tokenizer.get_vocab()
    pre_tokenize = tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str
    for caption in captions:
        for word, _ in pre_tokenize(caption.lower()):
            if word not in vocab:
                words = known_words(tokenizer)
                close = difflib.get_close_matches(word, words, n=3, cutoff=0.5)
                hint = f"; closest known words: {', '.join(close)}" if close else ""
                raise UserError(f"unknown word {word!r} in {caption!r}{hint}. "
                                f"The text encoder knows: {' '.join(words)}")


def tokenize(tokenizer, captions: list[str], check: bool = True, fixed_length: bool = False) -> dict:
    """``input_ids`` and ``attention_mask`` (B, L) for ``captions``, padded to the longest, or to
    the tokenizer's ``model_max_length`` with ``fixed_length`` (one shape for every batch, which a
    compiled model needs so as not to compile again; the padding is masked out).

    ``check`` (default) refuses unknown words instead of mapping them to ``<unk>``; a hub
    tokenizer (byte-pair, no unknown words) is passed through with ``check=False``.
    """
    if isinstance(captions, str):
        captions = [captions]
    if check:
        check_known(tokenizer, captions)
    encoded = tokenizer(list(captions), padding="max_length" if fixed_length else True, truncation=True,
                        return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
