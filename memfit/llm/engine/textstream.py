"""Detokenize a growing token sequence for streaming, and apply stop strings.

Two things make streaming text subtle:
- a multi-byte character can span tokens, so the decoded tail may be an incomplete character (U+FFFD);
- a stop string can span tokens, so text that might be the start of a stop string must be held back
  until it is known not to be one (the stop string itself is never returned, as in vLLM/OpenAI).
"""
from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stop: list[str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.stop = list(stop or [])
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""  # decoded text, truncated at a stop string once one is found
        self.stopped = False
        self._emitted = 0
        self._decoder = tokenizer.incremental_detokenizer()

    def add(self, token_ids: list[int]) -> None:
        """Update with the full list of output token ids (the last one is new)."""
        if self.stopped:
            return
        self.text += self._decoder.push(token_ids[len(self._decoder.ids) :])
        if self.stop:
            # Only the region that could contain a new match needs searching.
            start = max(0, self._emitted - self.holdback)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True

    def emit(self, final: bool = False) -> tuple[str, str]:
        """(text that is final so far, the new part since the last call)."""
        if final and not self.stopped:
            self.text += self._decoder.flush()
        if final or self.stopped:
            upto = len(self.text)
        else:
            upto = len(self.text) - self.holdback
        upto = max(upto, self._emitted)
        delta = self.text[self._emitted : upto]
        self._emitted = upto
        return self.text[:upto], delta
