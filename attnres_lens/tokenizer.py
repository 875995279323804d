"""A built-in byte-level tokenizer for tokenizer-less tiny models.

Token ``i < 256`` is the byte ``i`` of the UTF-8 encoding; ids ``>= 256`` are unused (a model may
have a larger vocabulary) and decode to nothing. Byte 0 (NUL) doubles as the padding id: it
never occurs in ordinary text.
"""

from __future__ import annotations

from typing import Optional

N_BYTES = 256


class ByteTokenizer:
    """Minimal tokenizer with the parts of the Hugging Face interface this library uses."""

    pad_token_id: int = 0
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    padding_side: str = "right"
    name_or_path: str = "attnres_lens/byte"

    @property
    def vocab_size(self) -> int:
        return N_BYTES

    def __len__(self) -> int:
        return N_BYTES

    def encode(self, text: str, add_special_tokens: bool = True, **kwargs: object) -> list[int]:  # noqa: ARG002
        """UTF-8 bytes of ``text``. Hugging Face's keyword arguments (``add_special_tokens``,
        ``truncation``, ...) are accepted and have no effect: this tokenizer has no special
        tokens and never truncates."""
        if not isinstance(text, str):
            raise TypeError(f"ByteTokenizer.encode takes a str, got {type(text).__name__}")
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens: bool = False) -> str:  # noqa: ARG002 - HF signature
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        return bytes(i for i in ids if 0 <= i < N_BYTES).decode("utf-8", errors="replace")

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        """One string per token. A byte that is not valid UTF-8 on its own shows as ``\\xNN``."""
        out = []
        for i in ids:
            if not 0 <= i < N_BYTES:
                out.append(f"<{i}>")
                continue
            try:
                out.append(bytes([i]).decode("utf-8"))
            except UnicodeDecodeError:
                out.append(f"\\x{i:02x}")
        return out

    def __repr__(self) -> str:
        return "ByteTokenizer()"


def hf_byte_tokenizer():
    """The byte tokenizer as a Hugging Face ``PreTrainedTokenizerFast`` (same ids, same
    padding), for tools that require one, such as TransformerLens' ``TransformerBridge``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbol = bytes_to_unicode()  # byte -> the printable character byte-level BPE spells it with
    model = models.BPE(vocab={symbol[b]: b for b in range(N_BYTES)}, merges=[])
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=symbol[ByteTokenizer.pad_token_id], padding_side="right"
    )
