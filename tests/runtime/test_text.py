"""Incremental detokenization (multi-byte characters, prompt context) and stop-string matching."""
import pytest

from fastlm.runtime.text import IncrementalDetokenizer, StopMatcher
from tests.runtime.tokenizers_util import train_byte_level_bpe, train_metaspace_bpe

TEXTS = ["Once upon a time, 日本語 😀 and héllo!", "🦊🦊 ça va", " the lazy dog; café 🦊 end."]


@pytest.fixture(scope="module")
def tokenizer():
    return train_byte_level_bpe()


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("prompt", ["", "The quick brown ", "naïve 日"])
def test_pieces_join_to_the_decoded_text_without_broken_characters(tokenizer, text, prompt):
    prompt_ids = tokenizer.encode(prompt).ids
    new_ids = tokenizer.encode(text).ids
    detok = IncrementalDetokenizer(tokenizer, prompt_ids)
    pieces = [detok.push([i]) for i in new_ids] + [detok.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text
    assert any(len(p) == 0 for p in pieces[:-1])  # multi-byte characters span tokens and were held


@pytest.mark.parametrize("prompt", ["", "Once", "the lazy fox"])
def test_leading_spaces_survive_a_metaspace_decoder(prompt):
    """SentencePiece-style decoders drop the first token's leading space; the prompt context keeps it."""
    tok = train_metaspace_bpe()
    prompt_ids, new_ids = tok.encode(prompt).ids, tok.encode(" upon a time, the fox").ids
    detok = IncrementalDetokenizer(tok, prompt_ids)
    text = "".join(detok.push([i]) for i in new_ids) + detok.flush()
    whole = tok.decode(prompt_ids + new_ids)
    assert text == whole[len(tok.decode(prompt_ids)):]
    assert text == ("upon a time, the fox" if not prompt else " upon a time, the fox")


def test_flush_emits_an_incomplete_character_as_replacement(tokenizer):
    ids = tokenizer.encode("ab 😀").ids
    detok = IncrementalDetokenizer(tokenizer)
    text = "".join(detok.push([i]) for i in ids[:-1])
    assert text.startswith("ab") and "\ufffd" not in text
    assert text + detok.flush() == "ab \ufffd"


def feed_all(matcher, pieces):
    out = []
    for piece in pieces:
        emitted, stopped = matcher.feed(piece)
        out.append(emitted)
        if stopped:
            return "".join(out), True
    return "".join(out) + matcher.flush(), False


@pytest.mark.parametrize("split", [1, 2, 3, 100])
def test_stop_string_and_what_follows_are_dropped(split):
    text = "abc\nde END\n\nxyz END"
    pieces = [text[i:i + split] for i in range(0, len(text), split)]
    assert feed_all(StopMatcher(["\n\n", "END"]), pieces) == ("abc\nde ", True)
    assert feed_all(StopMatcher(["\n\n"]), pieces) == ("abc\nde END", True)
    assert feed_all(StopMatcher(["nope"]), pieces) == (text, False)
    assert feed_all(StopMatcher([]), pieces) == (text, False)


def test_partial_stop_is_held_back_until_resolved():
    matcher = StopMatcher(["END"])
    assert matcher.feed("abE") == ("ab", False)
    assert matcher.feed("N") == ("", False)
    assert matcher.feed("x") == ("ENx", False)
    assert matcher.feed("EN") == ("", False)
    assert matcher.flush() == "EN"


def test_stop_string_with_multibyte_characters():
    pieces = ["héllo ", "日本", "語 rest"]
    assert feed_all(StopMatcher(["本語"]), pieces) == ("héllo 日", True)
