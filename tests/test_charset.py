import pytest
import torch

from clip4str.charset import CHARSETS, CharsetAdapter, LabelNormalizer, Tokenizer, resolve_charset


def test_builtin_charsets_sizes_and_order():
    assert [len(CHARSETS[k]) for k in ("36", "62", "94")] == [36, 62, 94]
    tok = Tokenizer(CHARSETS["94"])
    assert tok.itos[0] == "[E]" and tok.itos[1] == "0" and tok.itos[95] == "[B]" and tok.itos[96] == "[P]"
    assert (tok.eos_id, tok.bos_id, tok.pad_id, tok.num_classes, len(tok)) == (0, 95, 96, 95, 97)


def test_encode_pads_and_matches_reference_ids():
    tok = Tokenizer(CHARSETS["94"])
    ids = tok.encode(["Parity", "x7#Q"])
    # Ids of the authors' fixture (expected.json: train.tgt_ids).
    assert ids.tolist() == [[95, 52, 11, 28, 19, 30, 35, 0], [95, 34, 8, 65, 53, 0, 96, 96]]


def test_unknown_characters_are_dropped_and_counted():
    tok = Tokenizer(CHARSETS["36"])
    ids = tok.encode(["ab€c", "日本"])
    assert tok.ids_to_text(ids[0, 1:].tolist()) == "abc"
    assert ids[1].tolist()[:2] == [tok.bos_id, tok.eos_id]
    assert tok.dropped == {"€": 1, "日": 1, "本": 1}


def test_decode_confidence_includes_eos_and_respects_lengths():
    tok = Tokenizer("ab")
    probs = torch.tensor([[[0.1, 0.8, 0.1], [0.2, 0.1, 0.7], [0.9, 0.05, 0.05], [0.0, 1.0, 0.0]]])
    out = tok.decode(probs)[0]
    assert out.text == "ab"
    assert out.char_probs == pytest.approx([0.8, 0.7, 0.9])
    assert out.confidence == pytest.approx(0.8 * 0.7 * 0.9)
    cut = tok.decode(probs, lengths=[1])[0]
    assert (cut.text, cut.confidence) == ("a", pytest.approx(0.8))


def test_adapter_folds_case_and_filters():
    lower = CharsetAdapter(CHARSETS["36"])
    assert lower("Hello, World-42!") == "helloworld42"
    assert lower.dropped[","] == 1 and lower.dropped["!"] == 1
    upper = CharsetAdapter("ABC123")
    assert upper("abc-1") == "ABC1"
    mixed = CharsetAdapter(CHARSETS["62"])
    assert mixed("aB!") == "aB"


def test_label_normalizer_follows_reference_order():
    norm = LabelNormalizer(CHARSETS["36"], max_length=5)
    assert norm(" Ca fé ") == "cafe"  # whitespace removed, NFKD folds é to e
    assert norm("abcdef") is None  # too long, checked before charset filtering
    assert norm("a-b-c") == "abc"  # 5 characters before filtering: kept
    assert norm("---") is None  # empty after filtering
    assert (norm.stats.kept, norm.stats.too_long, norm.stats.empty) == (2, 1, 1)


def test_custom_unicode_charset_keeps_characters_and_spaces(tmp_path):
    path = tmp_path / "ja.txt"
    path.write_text("日本語\nカナ \n", encoding="utf-8")
    chars = resolve_charset(str(path))
    assert chars == "日本語カナ "
    norm = LabelNormalizer(chars, max_length=10)
    assert norm("日本  カナ") == "日本 カナ"  # no ASCII folding, single spaces kept
    tok = Tokenizer(chars)
    assert tok.ids_to_text(tok.encode(["語 カ"])[0, 1:].tolist()) == "語 カ"


@pytest.mark.parametrize("bad", ["", "abca"])
def test_bad_charsets_are_rejected(bad):
    with pytest.raises(ValueError, match="charset"):
        Tokenizer(bad)


def test_missing_charset_file():
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        resolve_charset("nope.txt")
