import pytest

from captioner.vocab import END, PAD, SPECIALS, START, UNK, Vocabulary, tokenize


def test_tokenize_lowercases_and_drops_punctuation():
    assert tokenize("A Red circle, to the LEFT of a blue square.") == [
        "a",
        "red",
        "circle",
        "to",
        "the",
        "left",
        "of",
        "a",
        "blue",
        "square",
    ]
    assert tokenize("  ") == []


def test_build_keeps_words_at_min_count_sorted_after_specials():
    caps = ["a red circle"] * 5 + ["a blue square"] * 4 + ["a blue circle"]
    v = Vocabulary.build(caps, min_count=5)
    # a: 10, circle: 6, red: 5, blue: 5 are kept; square: 4 is not.
    assert v.itos == [PAD, START, END, UNK, "a", "blue", "circle", "red"]
    assert (v.pad, v.start, v.end, v.unk) == (0, 1, 2, 3)
    assert len(v) == 8


def test_encode_wraps_in_start_end_and_maps_unknown_words():
    v = Vocabulary(list(SPECIALS) + ["a", "circle", "red"])
    assert v.encode("A red circle") == [v.start, 4, 6, 5, v.end]
    assert v.encode("a green circle") == [v.start, 4, v.unk, 5, v.end]


def test_decode_stops_at_end_and_skips_pad_and_start():
    v = Vocabulary(list(SPECIALS) + ["a", "circle", "red"])
    assert v.decode([v.start, 4, v.pad, 6, 5, v.end, 4, 4]) == "a red circle"
    assert v.decode(v.encode("a red circle")) == "a red circle"
    assert v.decode([v.unk, 99, -1]) == f"{UNK} {UNK} {UNK}"
    assert v.decode([]) == ""


def test_round_trip_through_list():
    v = Vocabulary.build(["two red squares"] * 5)
    assert Vocabulary(v.to_list()).itos == v.itos


@pytest.mark.parametrize(
    "words, message",
    [
        (["a", "b"], "must start with"),
        ([PAD, START, UNK, END, "a"], "must start with"),
        (list(SPECIALS) + ["a", "a"], "duplicate"),
    ],
)
def test_bad_word_lists_are_refused(words, message):
    with pytest.raises(ValueError, match=message):
        Vocabulary(words)
