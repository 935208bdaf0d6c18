"""Turning generated token ids into text, piece by piece, and cutting it at stop strings.

Byte-level BPE splits one Chinese character (3 UTF-8 bytes) over several tokens, so decoding token by token
would print replacement characters. `IncrementalDetokenizer` only releases text once it decodes cleanly.
`StopStringMatcher` holds back the tail that could still become a stop string, so a stop string that spans
two pieces is found and never shown.
"""

from __future__ import annotations

from typing import Any

REPLACEMENT_CHARACTER = "\ufffd"


class IncrementalDetokenizer:
    """Decode a growing list of token ids into text deltas that never split a character."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._token_ids: list[int] = []
        # Text is decoded from `_prefix_offset` on, so the tokenizer sees the context that decides spacing;
        # everything before `_read_offset` has already been returned.
        self._prefix_offset = 0
        self._read_offset = 0

    def _decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (often '' for a partial character)."""
        self._token_ids.append(token_id)
        already = self._decode(self._token_ids[self._prefix_offset : self._read_offset])
        current = self._decode(self._token_ids[self._prefix_offset :])
        if len(current) > len(already) and not current.endswith(REPLACEMENT_CHARACTER):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._token_ids)
            return current[len(already) :]
        return ""

    def flush(self) -> str:
        """At the end: whatever is still held back (invalid bytes come out as U+FFFD)."""
        already = self._decode(self._token_ids[self._prefix_offset : self._read_offset])
        current = self._decode(self._token_ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._token_ids)
        return current[len(already) :]


class StopStringMatcher:
    """Find the first stop string in a stream of text pieces; emit only text that precedes it."""

    def __init__(self, stop_strings: tuple[str, ...] | list[str]) -> None:
        self._stops = tuple(stop for stop in stop_strings if stop)
        self._pending = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Add a piece of text; return what can safely be shown. Sets `stopped` once a stop string appears."""
        if self.stopped:
            return ""
        if not self._stops:
            return piece
        text = self._pending + piece
        cut = min((index for stop in self._stops if (index := text.find(stop)) >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._pending = ""
            return text[:cut]
        held = self._longest_partial_stop(text)
        self._pending = text[len(text) - held :] if held else ""
        return text[: len(text) - held]

    def flush(self) -> str:
        """At the end of generation without a stop: the held-back tail is ordinary text after all."""
        text, self._pending = self._pending, ""
        return "" if self.stopped else text

    def _longest_partial_stop(self, text: str) -> int:
        """Length of the longest end of `text` that is the beginning of some stop string."""
        longest = 0
        for stop in self._stops:
            for length in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:length]):
                    longest = length
                    break
        return longest
