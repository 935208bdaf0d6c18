"""Incremental detokenizing (no split characters) and stop strings across piece boundaries."""

import pytest
from transformers import AutoTokenizer

from backend.engines.transformers_engine.text import IncrementalDetokenizer, StopStringMatcher


@pytest.fixture(scope="module")
def tokenizer(tiny_vl_dir):
    return AutoTokenizer.from_pretrained(tiny_vl_dir)


@pytest.mark.parametrize("text", ["舌质淡红，舌苔薄白。", "Hello 世界! 🌿 人参 ginseng", "  spaces\n\nand 龘 rare"])
def test_pieces_join_to_the_full_decode_and_never_hold_replacement_characters(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    detokenizer = IncrementalDetokenizer(tokenizer)
    pieces = [detokenizer.push(token) for token in ids]
    pieces.append(detokenizer.flush())
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)


def test_rare_characters_are_split_over_byte_tokens(tokenizer):
    # 龘 is not in the tiny vocabulary: three byte tokens, one character, released once complete.
    ids = tokenizer("龘", add_special_tokens=False)["input_ids"]
    assert len(ids) == 3
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert [detokenizer.push(token) for token in ids] == ["", "", "龘"]


def test_flush_releases_an_incomplete_character_as_replacement(tokenizer):
    ids = tokenizer("龘", add_special_tokens=False)["input_ids"]
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert detokenizer.push(ids[0]) == ""
    assert detokenizer.flush() == "\ufffd"


def test_special_tokens_are_not_shown(tokenizer):
    ids = tokenizer("好<|im_end|>", add_special_tokens=False)["input_ids"]
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert "".join(detokenizer.push(token) for token in ids) + detokenizer.flush() == "好"


def feed_all(matcher, pieces):
    return "".join(matcher.feed(piece) for piece in pieces)


def test_stop_string_inside_one_piece():
    matcher = StopStringMatcher(["END"])
    assert feed_all(matcher, ["abcENDxyz", "more"]) == "abc"
    assert matcher.stopped


def test_stop_string_across_pieces_is_never_emitted():
    matcher = StopStringMatcher(["###"])
    emitted = [matcher.feed(piece) for piece in ["舌红", "#", "#", "#后面"]]
    assert emitted == ["舌红", "", "", ""]
    assert matcher.stopped


def test_held_back_prefix_is_released_when_it_turns_out_not_to_stop():
    matcher = StopStringMatcher(["###"])
    assert matcher.feed("a#") == "a"
    assert matcher.feed("#b") == "##b"
    assert matcher.feed("#") == ""
    assert matcher.flush() == "#"
    assert not matcher.stopped


def test_earliest_of_several_stops_wins():
    matcher = StopStringMatcher(["苔", "舌"])
    assert matcher.feed("红舌黄苔") == "红"


def test_no_stops_passes_text_through():
    matcher = StopStringMatcher([])
    assert feed_all(matcher, ["a", "b"]) == "ab"
    assert matcher.flush() == ""


def test_templated_content_chunks_equal_the_pydantic_model():
    import json

    from backend.handlers.chat import ContentChunks
    from backend.protocol.chat import ChatCompletionChunk, ChunkChoice, ChunkDelta

    for text in ["舌红", 'quote " and \\ backslash', "\n\t", "🌿"]:
        fast = ContentChunks("chatcmpl-1", 123, "tiny").chunk(2, text)
        model = ChatCompletionChunk(
            id="chatcmpl-1", created=123, model="tiny", choices=[ChunkChoice(index=2, delta=ChunkDelta(content=text))]
        ).model_dump(exclude_none=True)
        assert fast.startswith("data: ") and fast.endswith("\n\n")
        assert json.loads(fast[6:]) == model
