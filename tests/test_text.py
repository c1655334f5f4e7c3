"""Tokenizer helpers: loading a bare vocab.txt, CJK-aware detokenization."""

from lsgpt.text import decode, encode_prompt, join_cjk, load_tokenizer


def test_bare_vocab_file_loads_every_entry(tmp_path):
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "我", "好", "hello", "world"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    tok = load_tokenizer(tmp_path / "vocab.txt")
    assert len(tok) == len(words)  # transformers 5 silently kept only the 5 special tokens with vocab_file=
    ids = encode_prompt(tok, "我好 hello world")
    assert ids == [2, 5, 6, 7, 8]
    assert decode(tok, ids) == "我好hello world"


def test_join_cjk_keeps_latin_spaces():
    assert join_cjk("我 好 难 受 , hello world 你 好") == "我好难受, hello world你好"
