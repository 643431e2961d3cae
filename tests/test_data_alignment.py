"""Text on the 12.5 Hz grid: moshi-finetune's placement and padding convention, and refused alignments."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moshi_ttt.data.alignment import (
    END_OF_TEXT_PADDING_ID,
    MAIN_SPEAKER,
    OTHER_SPEAKER,
    TEXT_PADDING_ID,
    AlignmentError,
    Word,
    load_alignments,
    place_words,
    tokenize_word,
)
from moshi_ttt.data.demo_dataset import train_tokenizer
from moshi_ttt.data.dialogue import CODE_WORDS, corpus

P, E = TEXT_PADDING_ID, END_OF_TEXT_PADDING_ID
VOCAB = {"hello": [10, 11], "big": [12], "world": [13, 14, 15], "yes": [16], "a": [17]}


def tok(word: str) -> list[int]:
    return VOCAB[word.strip(".,?")]


def test_words_land_on_their_start_frames_with_end_of_padding_before():
    words = [
        Word("hello", 0.0, 0.4, MAIN_SPEAKER),  # frame 0 (no end-of-padding before frame 0)
        Word("yes", 0.5, 0.9, OTHER_SPEAKER),  # the user's words never reach Moshi's text stream
        Word("big", 0.88, 1.0, MAIN_SPEAKER),  # 0.88 * 12.5 = 11.0: frame 11
        Word("world", 1.9, 2.5, MAIN_SPEAKER),  # 23.75: frame 23, tokens on 23, 24, 25
    ]
    text = place_words(words, 30, tok)
    expected = np.full(30, P)
    expected[[0, 1]] = VOCAB["hello"]
    expected[10], expected[11] = E, VOCAB["big"][0]
    expected[22], expected[23:26] = E, VOCAB["world"]
    np.testing.assert_array_equal(text.tokens, expected)
    assert text.words == 3 and text.tokens_placed == 6 and text.tokens_dropped == 0
    assert text.word_frames == {0: [0, 1], 2: [11], 3: [23, 24, 25]}


def test_unsorted_input_and_zero_length_words():
    words = [
        Word("big", 0.8, 0.9, MAIN_SPEAKER),
        Word("a", 0.0, 0.0, MAIN_SPEAKER),
        Word("yes", 0.1, 0.5, MAIN_SPEAKER),
    ]
    text = place_words(words, 12, tok)
    assert text.words == 2  # the zero-length "a" is dropped, as moshi-finetune drops it
    assert text.tokens[1] == VOCAB["yes"][0] and text.tokens[10] == VOCAB["big"][0] and text.tokens[9] == E
    assert text.tokens[0] == E  # the frame before "yes" (frame 1)


def test_overlapping_words_drop_leftover_tokens_or_queue_them():
    words = [
        Word("world", 0.0, 0.1, MAIN_SPEAKER),
        Word("big", 0.1, 0.5, MAIN_SPEAKER),
    ]  # "big" starts at frame 1
    dropped = place_words(words, 6, tok)
    np.testing.assert_array_equal(dropped.tokens, [13, 12, P, P, P, P])
    assert dropped.tokens_dropped == 2
    shifted = place_words(words, 6, tok, keep_and_shift=True)
    np.testing.assert_array_equal(shifted.tokens, [13, 14, 15, 12, P, P])
    assert shifted.tokens_dropped == 0


def test_tokens_past_the_end_are_counted_as_dropped():
    text = place_words([Word("world", 0.3, 0.5, MAIN_SPEAKER)], 5, tok)  # frame 3: room for 2 of 3 tokens
    np.testing.assert_array_equal(text.tokens, [P, P, E, 13, 14])
    assert text.tokens_dropped == 1


def test_main_speaker_label_is_configurable():
    words = [Word("yes", 0.0, 0.3, "A"), Word("big", 0.4, 0.6, "B")]
    text = place_words(words, 8, tok, main_speaker="B")
    assert text.tokens.tolist() == [P, P, P, P, E, 12, P, P]


def _write(tmp_path, body) -> str:
    path = tmp_path / "a.json"
    path.write_text(body if isinstance(body, str) else json.dumps(body))
    return path


@pytest.mark.parametrize(
    "body, reason",
    [
        ({"alignments": [["hi", [1.0, 0.5], MAIN_SPEAKER]]}, "alignment_start_after_end"),
        ({"alignments": [["hi", [1.0, 9.0], MAIN_SPEAKER]]}, "alignment_out_of_range"),
        ({"alignments": [["hi", [-2.0, 0.5], MAIN_SPEAKER]]}, "alignment_out_of_range"),
        ({"alignments": [["hi", 1.0, MAIN_SPEAKER]]}, "invalid_alignment"),
        ({"alignments": [["hi", ["x", 1.0], MAIN_SPEAKER]]}, "invalid_alignment"),
        ({"alignments": [["hi", [float("nan"), 1.0], MAIN_SPEAKER]]}, "invalid_alignment"),
        ({"words": []}, "invalid_alignment"),
        ("{not json", "invalid_alignment"),
    ],
)
def test_bad_alignments_are_refused_with_a_reason(tmp_path, body, reason):
    path = _write(tmp_path, body)
    with pytest.raises(AlignmentError) as info:
        load_alignments(path, duration=5.0)
    assert info.value.reason == reason and str(path) in str(info.value)


def test_missing_alignment_file(tmp_path):
    with pytest.raises(AlignmentError) as info:
        load_alignments(tmp_path / "nope.json", duration=5.0)
    assert info.value.reason == "missing_alignment"


def test_valid_alignments_and_meta_are_read(tmp_path):
    path = _write(
        tmp_path,
        {
            "alignments": [["hi", [0.1, 0.5], MAIN_SPEAKER], ["yo", [4.9, 5.3], OTHER_SPEAKER]],
            "meta": {"task": "x"},
        },
    )
    words, meta = load_alignments(path, duration=5.0)  # 5.3 is within the 0.5 s tolerance
    assert words == [Word("hi", 0.1, 0.5, MAIN_SPEAKER), Word("yo", 4.9, 5.3, OTHER_SPEAKER)]
    assert meta == {"task": "x"}


def test_demo_tokenizer_has_moshi_special_ids_and_whole_word_pieces(tmp_path):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(train_tokenizer(corpus(0), tmp_path / "t.model", 320)))
    assert [sp.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
    assert sp.is_unknown(0) and sp.is_control(3)
    assert 250 < sp.get_piece_size() <= 320
    ids = tokenize_word(sp, " falcon. ")
    assert ids == sp.encode("falcon.") and 0 not in ids and 3 not in ids
    assert all(len(tokenize_word(sp, w)) == 1 for w in CODE_WORDS)  # a recalled word is one token
