"""Byte-level BPE tokenizer (Hugging Face ``tokenizers``) trained on the world's text."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ..errors import TernvlmError

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<image>")  # ids 0..3, as VLMConfig expects


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> Tokenizer:
    """Byte-level BPE: any UTF-8 text encodes, and the world's words become single tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    for i, name in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(name) == i, f"special token {name} must have id {i}"
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except FileNotFoundError:
        raise TernvlmError(f"missing tokenizer: {path}") from None
    except Exception as exc:  # tokenizers raises plain Exception on parse errors
        if not Path(path).exists():
            raise TernvlmError(f"missing tokenizer: {path}") from None
        raise TernvlmError(f"corrupt tokenizer {path}: {str(exc).splitlines()[0]}") from None
