"""Generated token ids to text: incremental detokenization and stop strings.

`TextStreamer` turns ids into text pieces one token at a time with constant work per
token, stopping at stop strings; `truncate_at_stop` cuts a finished text at the first one.
"""

from __future__ import annotations

from collections.abc import Sequence

from .tokenizer import Tokenizer


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to the earliest occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]


class TextStreamer:
    """Turns generated token ids into text pieces, one call per token, with constant work a token.

    It keeps only the ids of the last decided piece (as context, so SentencePiece's
    leading-space rule and byte pieces decode as they do in the whole answer) and the ids
    after it, and only the text not yet released. A step emits only text that is complete
    (no trailing U+FFFD of a partial UTF-8 sequence), looks for stop strings in the text
    held back plus the new text (released text never ends with the start of a stop
    string, so none can begin before it), and holds back anything that could begin one.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []  # the last piece's ids (context), then the undecided ones
        self.context = 0  # ids[:context] are the last piece's
        self.held = ""  # decided text not yet released
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one token; return the newly decided text (possibly empty)."""
        if self.stopped:
            return ""
        self.ids.append(token)
        if not self._decide(final=False):
            return ""  # waiting for the rest of a multi-byte character
        return self._release(final=False)

    def flush(self) -> str:
        """Everything still held back, at the end of generation."""
        if not self.stopped:
            self._decide(final=True)
        return self._release(final=True)

    def _decide(self, final: bool) -> bool:
        """Append the text of the undecided ids; False (nothing appended) while it ends mid-character."""
        if self.context == len(self.ids):
            return True
        known = self.tokenizer.decode(self.ids[: self.context])
        extended = self.tokenizer.decode(self.ids)
        if extended.endswith("\ufffd") and not final:
            return False
        self.held += extended[len(known) :]
        self.ids = self.ids[self.context :]  # the new piece becomes the next one's context
        self.context = len(self.ids)
        return True

    def _release(self, final: bool) -> str:
        end = len(self.held)
        hits = [hit for hit in (self.held.find(s) for s in self.stop) if hit >= 0]
        if hits:
            end, self.stopped = min(hits), True
        elif not final:
            end -= self._partial_stop_len()
        piece, self.held = self.held[:end], ("" if self.stopped else self.held[end:])
        return piece

    def _partial_stop_len(self) -> int:
        """Length of the longest suffix of the held text that is a proper prefix of a stop string."""
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.held)), 0, -1):
                if self.held.endswith(s[:n]):
                    longest = max(longest, n)
                    break
        return longest
