"""A built-in byte-level tokenizer for tokenizer-less tiny models.

Token ``i < 256`` is the byte ``i`` of the UTF-8 encoding; ids ``>= 256`` are unused (a model may
have a larger vocabulary) and decode to nothing. Byte 0 (NUL) doubles as the padding id: it
never occurs in ordinary text.
"""

from __future__ import annotations

from typing import Optional

N_BYTES = 256
#: Set on :func:`hf_byte_tokenizer`'s tokenizers: they have no BOS (and TL's ``<|endoftext|>``,
#: which TransformerLens adds as one, is no token of a byte-level model).
BYTE_LEVEL_MARK = "attnres_byte_level"


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
    padding), for tools that require one, such as TransformerLens' ``TransformerBridge``.

    It declares exactly what a byte-level model embeds: the 256 byte values (``vocab_size``),
    the pad id 0, and no BOS/EOS. TransformerLens adds ``<|endoftext|>`` (id 256) as BOS/EOS
    to such a tokenizer; the bridge refuses ``prepend_bos=True`` on it (``docs/hooks.md``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbol = bytes_to_unicode()  # byte -> the printable character byte-level BPE spells it with
    model = models.BPE(vocab={symbol[b]: b for b in range(N_BYTES)}, merges=[])
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=symbol[ByteTokenizer.pad_token_id],
        padding_side="right",
        name_or_path=ByteTokenizer.name_or_path,
    )
    setattr(hf, BYTE_LEVEL_MARK, True)
    return hf
