"""A word-level tokenizer built in code (no download), saved next to every mini-world model.

The vocabulary is the closed set of words the question generator can produce plus the LLaVA chat
markers. It is a genuine ``transformers`` fast tokenizer (``tokenizers`` WordLevel model), so
``save_pretrained`` / ``AutoTokenizer.from_pretrained`` round-trip offline.
"""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from .questions import vocabulary

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"
USER, ASSISTANT = "USER:", "ASSISTANT:"
SPECIALS: tuple[str, ...] = (PAD, BOS, EOS, UNK, IMAGE, USER, ASSISTANT)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The mini world's tokenizer; token ids are a fixed function of the package code."""
    words = list(SPECIALS) + [w for w in vocabulary() if w not in SPECIALS]
    tk = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token=UNK))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 1)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        extra_special_tokens={"image_token": IMAGE},
    )
    return tok


def encode_words(tok: PreTrainedTokenizerFast, text: str) -> list[int]:
    """Ids of whitespace-separated ``text`` (no BOS); raises if a word is out of vocabulary."""
    vocab = tok.get_vocab()
    ids = []
    for w in text.split():
        if w not in vocab:
            raise ValueError(f"word {w!r} is not in the mini-world vocabulary ({len(vocab)} words)")
        ids.append(vocab[w])
    return ids


def decode_answer(tok: PreTrainedTokenizerFast, ids: list[int]) -> str:
    """Generated ids -> answer string, stopping at EOS and dropping padding/special tokens."""
    words = []
    for i in ids:
        if i == tok.eos_token_id:
            break
        if i == tok.pad_token_id:
            continue
        words.append(tok.convert_ids_to_tokens(int(i)))
    return " ".join(words)
