"""Streaming detokenization: token ids in, complete new text out.

Decoding one token at a time is wrong twice over: a byte-level token can hold half a UTF-8 character
(decoded alone it is '\\ufffd'), and SentencePiece decoders drop the leading space of the first piece
("▁world" alone is "world"). Like vLLM's `detokenize_incrementally`, we decode a small window twice —
the already-emitted tail `ids[prefix:read]` and the same tail plus the new tokens `ids[prefix:]` — and emit
the difference, holding it back while it ends in '\\ufffd' (a character still incomplete). Per token this
decodes a handful of ids, never the whole output. Call `flush` when the sequence ends.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.loading.tokenizer import Tokenizer

# Prompt tokens decoded as left context for the first output token (vLLM uses 5 as well): enough for
# SentencePiece spacing and for a character split across the prompt/output boundary.
PROMPT_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Turns one sequence's output tokens into text, one token at a time.

    Invariant: `ids[prefix_offset:read_offset]` (left context: the prompt's last tokens, then the tokens
    read last) decodes to text that ends on a character boundary and has been emitted (or is prompt);
    `ids[read_offset:]` are tokens whose text is not emitted yet. `text` is everything emitted.
    Special tokens are skipped by default (an EOS adds no text).
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int] | None = None,
                 skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        context = list(prompt_token_ids or [])[-PROMPT_CONTEXT_TOKENS:]
        self._prefix_text = self._decode(context)
        if self._prefix_text.endswith("\ufffd"):
            # The prompt (client token ids) ends mid-character: output bytes must not merge into a
            # prompt character, so decode the output on its own.
            context, self._prefix_text = [], ""
        self._ids: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._chunks: list[str] = []
        self.num_output_tokens = 0

    @property
    def text(self) -> str:
        """All text emitted so far (the concatenation of every `add` / `flush` result)."""
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    def add(self, token_id: int) -> str:
        """Append one output token; return the new complete text it makes (often "", never half a char)."""
        self._ids.append(token_id)
        self.num_output_tokens += 1
        full = self._decode(self._ids[self._prefix_offset:])
        # Hold back while the last character is incomplete. Bytes that are simply invalid (or a literal
        # U+FFFD) come out with the next complete text, or from `flush` when the sequence ends.
        if len(full) <= len(self._prefix_text) or full.endswith("\ufffd"):
            return ""
        return self._emit(full)

    def flush(self) -> str:
        """Emit whatever is held back (e.g. an incomplete character at the end of the sequence)."""
        if self._read_offset == len(self._ids):
            return ""
        full = self._decode(self._ids[self._prefix_offset:])
        return self._emit(full) if len(full) > len(self._prefix_text) else ""

    def _emit(self, full: str) -> str:
        new = full[len(self._prefix_text):]
        # Slide the window: the newly read tokens become the left context of the next step.
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._prefix_text = self._decode(self._ids[self._prefix_offset:])
        self._chunks.append(new)
        return new

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special) if ids else ""
