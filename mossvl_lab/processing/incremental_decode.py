"""Streaming detokenisation: token ids in, text pieces out, never splitting a multi-byte character."""

from __future__ import annotations

import codecs
import functools
import json
from collections.abc import Iterable
from typing import TYPE_CHECKING

from tokenizers import Tokenizer as BackendTokenizer

from .tokenizer import ProcessingError

if TYPE_CHECKING:
    from .tokenizer import Tokenizer


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2 byte-level table inverted: printable stand-in character -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _is_byte_level(backend: BackendTokenizer) -> bool:
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    return any(d.get("type") == "ByteLevel" for d in parts)


class IncrementalDecoder:
    """Token ids in, UTF-8-safe text pieces out: a multi-byte character split across tokens is held back until
    complete. Special tokens come out as their literal string unless `skip_special_tokens`. The concatenation of
    every piece and `flush()` equals `tokenizer.decode(all_ids, skip_special_tokens)`."""

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._byte_level = _is_byte_level(tokenizer.backend)
        self.reset()

    def reset(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._ids: list[int] = []   # fallback path: every id so far
        self._emitted = 0           # fallback path: characters already returned

    def push(self, token_id: int) -> str:
        """Feed one id; returns the text that became complete (possibly "")."""
        token_id = int(token_id)
        if not self._byte_level:
            self._ids.append(token_id)
            text = self.tokenizer.decode(self._ids, self.skip_special_tokens)
            if text.endswith("\ufffd"):
                return ""
            piece, self._emitted = text[self._emitted:], len(text)
            return piece
        added = self.tokenizer._added.get(token_id)
        if added is not None:
            if added.special and self.skip_special_tokens:
                return ""
            return self._utf8.decode(b"", final=True) + added.content
        token = self.tokenizer.id_to_token(token_id)
        if token is None:
            raise ProcessingError(f"token id {token_id} is not in the vocabulary (size {len(self.tokenizer)})")
        table = _byte_decoder()
        data = bytes(table[c] for c in token) if all(c in table for c in token) else token.encode("utf-8")
        return self._utf8.decode(data)

    def extend(self, ids: Iterable[int]) -> str:
        return "".join(self.push(i) for i in ids)

    def flush(self) -> str:
        """End of stream: whatever is still held back (an incomplete character becomes U+FFFD)."""
        if not self._byte_level:
            text = self.tokenizer.decode(self._ids, self.skip_special_tokens)
            piece, self._emitted = text[self._emitted:], len(text)
            return piece
        return self._utf8.decode(b"", final=True)
