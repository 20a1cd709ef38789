"""Incremental detokenization with the real SmolLM2 tokenizer: the pieces a client sees, concatenated, are
exactly ``decode(all_ids, skip_special_tokens=True)``, and no piece ever carries half a character."""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from frontdoor.tokenizer import ModelTokenizer

TEXTS = [
    "Hello world, héllo 日本語 🙂!",
    "  leading spaces and\ttabs\n\nnew lines  ",
    "emoji family 👨‍👩‍👧 and flags 🇫🇷🇯🇵",
    "Ελληνικά, русский, العربية, हिन्दी",
    "code: def f(x):\n    return x ** 2  # 😀",
    "a",
]


def pieces(tokenizer: ModelTokenizer, ids: Iterable[int], step: int = 1) -> list[str]:
    detok = tokenizer.detokenizer()
    ids = list(ids)
    out = [detok.push(ids[i : i + step]) for i in range(0, len(ids), step)]
    out.append(detok.flush())
    return out


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("step", [1, 2, 5])
def test_pieces_concatenate_to_decode(model_tokenizer: ModelTokenizer, text: str, step: int) -> None:
    ids = model_tokenizer.encode(text)
    got = pieces(model_tokenizer, ids, step)
    assert "".join(got) == model_tokenizer.decode(ids) == text
    assert not any("\ufffd" in piece for piece in got)


def test_incomplete_character_is_held_back(model_tokenizer: ModelTokenizer) -> None:
    ids = model_tokenizer.encode(" 日本語")
    assert len(ids) > 3  # byte-level BPE splits these characters across tokens
    detok = model_tokenizer.detokenizer()
    seen = [detok.push([token_id]) for token_id in ids]
    assert "".join(seen) == " 日本語"
    # Every piece is whole characters: some steps emit nothing while a character is incomplete.
    assert "" in seen
    whole_characters = {"日", "本", "語", "日本", "本語", "日本語"}
    assert all(piece == "" or piece.strip(" ") in whole_characters for piece in seen)
    assert detok.flush() == ""


def test_special_tokens_are_skipped(model_tokenizer: ModelTokenizer) -> None:
    eos = model_tokenizer.eos_token_id
    assert eos is not None
    hello = model_tokenizer.encode("Hello")
    there = model_tokenizer.encode(" there")
    ids = [1, *hello, eos, *there, eos]  # <|im_start|> Hello <|im_end|> there <|im_end|>
    detok = model_tokenizer.detokenizer()
    assert detok.push([1]) == ""
    assert detok.push(hello) == "Hello"
    assert detok.push([eos]) == ""
    assert detok.push(there) == " there"
    assert detok.push([eos]) + detok.flush() == ""
    assert detok.token_ids == tuple(ids)
    assert model_tokenizer.decode(ids) == "Hello there"


def test_truncated_character_comes_out_at_flush(model_tokenizer: ModelTokenizer) -> None:
    ids = model_tokenizer.encode(" 日本語")
    cut = ids[:-1]  # the stream ends (max_tokens) in the middle of the last character
    got = pieces(model_tokenizer, cut)
    assert "".join(got) == model_tokenizer.decode(cut)
    assert got[-1].endswith("\ufffd")  # only flush() lets the replacement character out


def test_empty_request(model_tokenizer: ModelTokenizer) -> None:
    detok = model_tokenizer.detokenizer()
    assert detok.push([]) == ""
    assert detok.flush() == ""


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_id_sequence_matches_decode(model_tokenizer: ModelTokenizer, data: st.DataObject) -> None:
    """Random ids, byte-fragment tokens and special tokens included (invalid UTF-8 mid-stream too)."""
    vocab = model_tokenizer.vocab_size
    text_ids = model_tokenizer.encode(data.draw(st.text(min_size=1, max_size=12), label="text"))
    any_ids = data.draw(st.lists(st.integers(0, vocab - 1), max_size=12), label="ids")
    specials = data.draw(st.lists(st.sampled_from([0, 1, 2]), max_size=3), label="specials")
    ids = data.draw(st.permutations(text_ids + any_ids + specials), label="order")
    step = data.draw(st.integers(1, 4), label="step")
    assert "".join(pieces(model_tokenizer, ids, step)) == model_tokenizer.decode(ids)
