"""From token ids to text pieces: incremental detokenization and stop strings.

IncrementalDetokenizer (the prefix/read-offset scheme of vLLM and HF's TextStreamer): decoding ids one
at a time breaks multi-byte characters (byte-level BPE splits them across tokens) and leading spaces
(SentencePiece-style decoders strip the first one). So each push decodes a short window that starts a
few tokens back, emits only what the window added beyond its already-emitted prefix, and waits while
the text ends in U+FFFD (an incomplete UTF-8 sequence). The last tokens of the prompt seed the window,
so the first new token decodes with its real left context.

StopMatcher holds back the longest tail of the text that could still grow into a stop string, so a
stream never shows part of a stop string; on a match it emits the text before the earliest
occurrence and reports the stop. Matching works on decoded str, so a multi-byte character is never
split.
"""
from typing import Sequence

_REPLACEMENT = "\ufffd"
_CONTEXT_TOKENS = 6  # prompt tokens kept as left context of the first window


class IncrementalDetokenizer:
    """push(ids) -> the new text those ids complete ('' while a character is incomplete)."""

    def __init__(self, tokenizer, prompt_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.tokens = list(prompt_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0  # window start
        self.read_offset = len(self.tokens)  # tokens before this are emitted

    def push(self, ids: Sequence[int]) -> str:
        self.tokens.extend(ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """Whatever is left at the end, incomplete characters included (as U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self.read_offset == len(self.tokens):
            return ""
        decode = self.tokenizer.decode
        prefix_text = decode(self.tokens[self.prefix_offset:self.read_offset])
        full_text = decode(self.tokens[self.prefix_offset:])
        if len(full_text) <= len(prefix_text) and not final:
            return ""
        if full_text.endswith(_REPLACEMENT) and not final:
            return ""
        piece = full_text[len(prefix_text):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        return piece


class StopMatcher:
    """feed(piece) -> (text safe to emit, stopped). After a stop, everything else is dropped."""

    def __init__(self, stops: Sequence[str] = ()):
        self.stops = tuple(stops)
        self.held = ""
        self.stopped = False

    def feed(self, piece: str):
        if self.stopped:
            return "", True
        if not self.stops:
            return piece, False
        text = self.held + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held, self.stopped = "", True
            return text[:min(hits)], True
        keep = self._partial_match_length(text)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False

    def flush(self) -> str:
        """The held-back tail when generation ends without a stop."""
        held, self.held = self.held, ""
        return "" if self.stopped else held

    def _partial_match_length(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of some stop string."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best


class SequenceText:
    """The text side of one generated sequence: token ids in, safe-to-show pieces out."""

    def __init__(self, tokenizer, prompt_ids: Sequence[int] = (), stops: Sequence[str] = ()):
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
        self.matcher = StopMatcher(stops)

    @property
    def stopped(self) -> bool:
        return self.matcher.stopped

    def add(self, token: int):
        """-> (piece, stopped): stopped is True when this token completed a stop string."""
        return self.matcher.feed(self.detokenizer.push([token]))

    def finish(self) -> str:
        """The rest of the text once generation ended without a stop string."""
        if self.matcher.stopped:
            return ""
        piece, _ = self.matcher.feed(self.detokenizer.flush())
        return piece + self.matcher.flush()
