"""Stop strings in streamed text: where a reply ends, and what is safe to show before that is known.

Text arrives in pieces (one decoded token at a time). Generation ends with the first piece after which
the text holds a stop string starting at or after `search_from` (the end of the first min_new_tokens
tokens' text), and the reply ends right before the earliest-starting stop string in that text (a
longer one that would start earlier but is not complete yet never will be: nothing more is
generated). Streaming must not show a piece that may turn out to be the start of a stop string, so
the last max(len(stop)) - 1 characters are held back until the next piece shows they are not;
`flush` releases them at the end.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopStrings:
    """Feed decoded pieces; get back the text that can be shown, and whether a stop string was found."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1  # characters that may start a stop string
        self.text = ""  # everything fed so far
        self.shown = 0  # characters of `text` already returned
        self.search_from = 0  # a stop string must start here or later (min_new_tokens)
        self.stopped = False

    def feed(self, piece: str, *, armed: bool = True) -> str:
        """Add `piece`; return the text that is now safe to show. `armed` False (fewer than min_new_tokens
        tokens so far): no stop string can end the reply, and what there is so far can never be cut."""
        if self.stopped:
            return ""
        start = max(self.search_from, len(self.text) - self.hold)  # an earlier match would have been found
        self.text += piece
        if not armed:
            self.search_from = len(self.text)
            return self._show(len(self.text))
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            self.text = self.text[:min(hits)]
            return self._show(len(self.text))
        return self._show(max(self.search_from, len(self.text) - self.hold))

    def flush(self) -> str:
        """The held-back rest, once no more text will come."""
        return self._show(len(self.text))

    def _show(self, upto: int) -> str:
        piece = self.text[self.shown:upto] if upto > self.shown else ""
        self.shown = max(self.shown, upto)
        return piece
