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


def test_tokenizer_path_typo_fails_at_once_without_the_hub(tmp_path, monkeypatch):
    import pytest

    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("lsgpt.text._hub_reachable", lambda *a, **k: pytest.fail("a local path typo went to the hub"))
    with pytest.raises(FileNotFoundError, match="data/tokenizr"):
        load_tokenizer("data/tokenizr")  # 'data' is a local folder: a typo, not a hub id
    with pytest.raises(FileNotFoundError, match="vocab.txt"):
        load_tokenizer("data")  # a folder without a vocabulary


def test_hub_id_offline_fails_with_a_clear_error(monkeypatch):
    import pytest

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="hub"):
        load_tokenizer("nobody-here/no-such-tokenizer")
