"""Tokenizer helpers shared by training, the engine CLIs, the Triton models and the client (no torch).

Prompt format (one choice shared by training and generation):
  training paragraph  = [CLS] text [SEP]      ([SEP] is the EOS the model learns)
  generation prompt   = [CLS] text            (no [SEP]: the model continues the paragraph and ends it)
Detokenization removes the spaces BertTokenizer puts around CJK characters, and keeps real spaces
between Latin words (the demo's "".join(text.split()) deleted those too).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from functools import lru_cache

CLS, SEP, PAD, UNK = "[CLS]", "[SEP]", "[PAD]", "[UNK]"

# CJK ideographs, CJK punctuation, full-width forms, kana, hangul: scripts written without spaces.
_CJK = (
    "\u2e80-\u2fff\u3000-\u303f\u3040-\u30ff\u3100-\u312f\u3190-\u31ff\u3400-\u4dbf\u4e00-\u9fff"
    "\uac00-\ud7af\uf900-\ufaff\ufe30-\ufe4f\uff00-\uffef"
)
_SPACE_AFTER_CJK = re.compile(f"(?<=[{_CJK}]) +")
_SPACE_BEFORE_CJK = re.compile(f" +(?=[{_CJK}])")


def load_tokenizer(name_or_path: str | os.PathLike):
    """A BertTokenizerFast from a folder, a vocab.txt file, or a hub id (hub needs network)."""
    from transformers import BertTokenizerFast

    p = os.fspath(name_or_path)
    if os.path.isfile(p):  # a bare vocab.txt (transformers 5 ignores vocab_file=: pass the mapping itself)
        with open(p, encoding="utf-8") as f:
            vocab = {line.rstrip("\n"): i for i, line in enumerate(f) if line.rstrip("\n")}
        return BertTokenizerFast(vocab=vocab, do_lower_case=False, tokenize_chinese_chars=True)
    if not os.path.isdir(p) and not _looks_like_hub_id(p):
        raise FileNotFoundError(f"tokenizer not found: {p!r} is neither a folder with vocab.txt nor a vocab.txt file")
    if os.path.isdir(p) and not os.path.isfile(os.path.join(p, "vocab.txt")) and not os.path.isfile(
            os.path.join(p, "tokenizer.json")):
        raise FileNotFoundError(f"tokenizer not found: the folder {p!r} has no vocab.txt (or tokenizer.json)")
    try:
        if os.path.isdir(p):
            return _nonempty(BertTokenizerFast.from_pretrained(p), p)
        try:  # a hub id: the local cache first
            return _nonempty(BertTokenizerFast.from_pretrained(p, local_files_only=True), p)
        except OSError:
            pass
        if os.environ.get("HF_HUB_OFFLINE") == "1" or not _hub_reachable():  # fail in seconds, not minutes of retries
            raise OSError("the Hugging Face hub is not reachable from here and the id is not in the local cache")
        return _nonempty(BertTokenizerFast.from_pretrained(p), p)
    except OSError as e:
        raise FileNotFoundError(
            f"cannot load a BERT tokenizer from {p!r}: give a folder with vocab.txt, a vocab.txt file, "
            f"or a hub id on a machine with network ({e})"
        ) from None


def _nonempty(tok, p: str):
    """transformers 5 returns a tokenizer of special tokens only for an id it could not find: refuse it."""
    if len(tok) <= len(tok.all_special_tokens) + 1:
        raise OSError(f"no vocabulary found for {p!r}")
    return tok


def _looks_like_hub_id(p: str) -> bool:
    """'org/name' (one slash, no leading / or .) whose first part is not a local folder: 'data/tokenizr'
    (a typo of a local path) is not a hub id, 'uer/gpt2-chinese-cluecorpussmall' is."""
    parts = p.split("/")
    return len(parts) == 2 and all(parts) and not p.startswith((".", "/", "~")) and not os.path.isdir(parts[0])


def _hub_reachable(timeout: float = 3.0) -> bool:
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@lru_cache(maxsize=8)
def cached_tokenizer(name_or_path: str):
    return load_tokenizer(name_or_path)


def encode_paragraph(tok, text: str) -> list[int]:
    """Training form: [CLS] text [SEP]."""
    return [tok.cls_token_id, *tok.encode(text, add_special_tokens=False), tok.sep_token_id]


def encode_prompt(tok, text: str) -> list[int]:
    """Generation form: [CLS] text (the model continues and ends the paragraph with [SEP])."""
    return [tok.cls_token_id, *tok.encode(text, add_special_tokens=False)]


def join_cjk(text: str) -> str:
    """Remove spaces next to CJK characters only; Latin word spacing stays."""
    return _SPACE_BEFORE_CJK.sub("", _SPACE_AFTER_CJK.sub("", text))


def decode(tok, ids: Sequence[int]) -> str:
    """Token ids -> text, special tokens dropped, CJK spacing removed."""
    return join_cjk(tok.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=True))


class IncrementalDecoder:
    """Turns a growing list of token ids into text increments whose concatenation is decode(all ids).

    Each call decodes the whole sequence and emits the new suffix; text that may still change when
    the next token arrives (a trailing word that a '##' piece can extend, a space whose neighbour is
    not known yet) is held back until it is settled, or until flush().
    """

    def __init__(self, tok, prompt_ids: Sequence[int] = ()):
        self.tok = tok
        self.ids: list[int] = list(prompt_ids)
        self.emitted = decode(tok, self.ids)
        self._prefix_len = len(self.emitted)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        full = decode(self.tok, self.ids)
        # Hold back the last word (may grow by a '##' piece) and any trailing space.
        safe = len(full)
        m = re.search(r"[A-Za-z0-9\s]+$", full)
        if m:
            safe = m.start()
        if not full.startswith(self.emitted) or safe <= len(self.emitted):
            return ""
        out = full[len(self.emitted) : safe]
        self.emitted += out
        return out

    def flush(self) -> str:
        full = decode(self.tok, self.ids)
        out = full[len(self.emitted) :] if full.startswith(self.emitted) else ""
        self.emitted = full
        return out

    @property
    def text(self) -> str:
        """The generated text so far (without the prompt)."""
        return self.emitted[self._prefix_len :]
