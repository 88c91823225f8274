"""A character-level tokenizer built with the `tokenizers` library, saved as a standard HF tokenizer.

Teacher and student share it (decompression keeps the embeddings), so it is built once per run from
a fixed alphabet: the same alphabet always gives the same ids.
"""

from __future__ import annotations

import string
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
# Printable ASCII plus newline covers the synthetic data and nearly all of GSM8K.
DEFAULT_ALPHABET = "".join(sorted(set(string.printable) - set("\t\r\x0b\x0c")))


def build_char_tokenizer(alphabet: str = DEFAULT_ALPHABET) -> PreTrainedTokenizerFast:
    """A char-level `PreTrainedTokenizerFast`: one token per character, `<s>` prepended on encode."""
    chars = sorted(set(alphabet))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in chars:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Every character, newline included, is its own pre-token.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="left",  # left padding: batched generation appends after the prompt
        clean_up_tokenization_spaces=False,
    )


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer saved with `save_pretrained` (ours or any HF fast tokenizer)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer path does not exist: {path}")
    return AutoTokenizer.from_pretrained(str(path))


def tokenizers_match(a: PreTrainedTokenizerFast, b: PreTrainedTokenizerFast) -> bool:
    """True when two tokenizers map text to the same ids (same vocab and special tokens)."""
    return (
        a.get_vocab() == b.get_vocab()
        and a.pad_token_id == b.pad_token_id
        and a.eos_token_id == b.eos_token_id
        and a.bos_token_id == b.bos_token_id
    )
