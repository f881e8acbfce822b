"""Turns a sequence's new tokens into streamed RequestOutputs: incremental text and stop strings."""
from __future__ import annotations

from engine.core.detokenizer import IncrementalDetokenizer
from engine.core.request import RequestOutput, RequestStream
from engine.core.sequence import Sequence


class RequestState:
    """Per-request streaming state, owned by the engine thread.

    Invariant: `sent_tokens` output tokens and `sent_chars` characters of `detok.text` have been streamed.
    With stop strings, the last (longest stop - 1) characters are held back, so a stop string that spans
    two steps is never half-streamed before it is recognised.
    """

    def __init__(self, seq: Sequence, stream: RequestStream, detok: IncrementalDetokenizer):
        self.seq = seq
        self.stream = stream
        self.detok = detok
        self.stops = seq.sampling.stop
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.sent_tokens = 0
        self.sent_chars = 0
        self.seen_tokens = 0
        self.stop_at: int | None = None   # text length at which a stop string starts

    def absorb(self) -> bool:
        """Detokenizes tokens not seen yet; returns True when a stop string appeared (the text is cut there;
        the token that completed it is the last one, since a step samples one token per sequence)."""
        out = self.seq.output_token_ids
        while self.seen_tokens < len(out) and self.stop_at is None:
            before = len(self.detok.text)
            self.detok.add(out[self.seen_tokens])
            self.seen_tokens += 1
            text = self.detok.text
            hits = [i for s in self.stops if (i := text.find(s, max(0, before - len(s) + 1))) >= 0]
            if hits:
                self.stop_at = min(hits)
        return self.stop_at is not None

    def output(self, finished: bool) -> RequestOutput | None:
        """The next event: tokens and text not streamed yet (None when there is nothing to send)."""
        if finished and self.stop_at is None:
            self.detok.flush()
        text = self.detok.text
        end = self.stop_at if self.stop_at is not None else (len(text) if finished else
                                                              max(self.sent_chars, len(text) - self.hold))
        new_tokens = tuple(self.seq.output_token_ids[self.sent_tokens:])
        if not finished and not new_tokens and end <= self.sent_chars:
            return None
        delta = text[self.sent_chars:end]
        self.sent_chars = max(self.sent_chars, end)
        self.sent_tokens += len(new_tokens)
        return RequestOutput(
            request_id=self.seq.request_id, new_token_ids=new_tokens, text=delta,
            finish_reason=self.seq.finish_reason if finished else None,
            prompt_tokens=self.seq.prompt_len, completion_tokens=len(self.seq.output_token_ids),
            cached_prompt_tokens=self.seq.cached_prompt_tokens)
