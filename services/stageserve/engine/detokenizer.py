"""Incremental detokenization and stop-string handling for one request's streamed output."""

from __future__ import annotations

from typing import Any

from stageserve.core.sampling import SamplingParams


class IncrementalDetokenizer:
    """Turns output token ids into text deltas, never emitting half a UTF-8 character or any text that
    could still turn out to be the start of a stop string."""

    def __init__(self, tokenizer: Any, params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.params = params
        self.token_ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self._prefix_offset = 0
        self._read_offset = 0
        self._holdback = max((len(s) for s in params.stop), default=1) - 1

    def append(self, token_id: int) -> bool:
        """Adds a token; returns True when a stop string now appears (the text is cut accordingly)."""
        self.token_ids.append(token_id)
        skip = self.params.skip_special_tokens
        prefix = self.tokenizer.decode(
            self.token_ids[self._prefix_offset : self._read_offset], skip_special_tokens=skip
        )
        full = self.tokenizer.decode(self.token_ids[self._prefix_offset :], skip_special_tokens=skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            new_text = full[len(prefix) :]
            self._prefix_offset, self._read_offset = self._read_offset, len(self.token_ids)
            return self._extend(new_text)
        return False

    def _extend(self, new_text: str) -> bool:
        search_from = max(0, len(self.text) - self._holdback)
        self.text += new_text
        for stop in self.params.stop:
            at = self.text.find(stop, search_from)
            if at >= 0:
                self.text = self.text[: at + (len(stop) if self.params.include_stop_str_in_output else 0)]
                return True
        return False

    def take_delta(self, finished: bool) -> str:
        """Text not yet emitted; the last few characters wait until they cannot begin a stop string."""
        end = len(self.text) if finished or not self.params.stop else max(self.emitted, len(self.text) - self._holdback)
        delta = self.text[self.emitted : end]
        self.emitted = end
        return delta
