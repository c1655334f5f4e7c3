"""The article's generate.py, against our engine in process or a served model.

    python client/generate.py -m model/fp16/pytorch_model.hdf5 -p data/tokenizer    # in process (like the article)
    python client/generate.py -m model/int8/pytorch_model.hdf5 -q -p data/tokenizer -i "我今天很开心，"
    python client/generate.py -m gpt2 --url localhost:8001 -p data/tokenizer     # through Triton (gRPC)
    python client/generate.py -q --url localhost:8001 --stream -i "我今天"        # gpt2_int8_stream

-m: an HDF5 file -> our engine in this process (needs torch); anything else -> a served model name.
-q: int8. In process it checks the file is an int8 (QuantGpt) file; served, the default model becomes gpt2_int8.
Prints each text (prompt + continuation) followed by a ===== line, then the time taken.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

from lsgpt.client.api import DEFAULT_TOKENIZER, Client, ClientError, InvalidRequest, check_sampling
from lsgpt.contract import PARAMS
from lsgpt.text import cached_tokenizer, decode, encode_prompt

DEFAULT_PROMPTS = ["我要找个男朋友，", "我今天很开心，"]  # the article's default batch
FLAG_HELP = {"repetition_penalty": "HF semantics; 1: off (e.g. 1.2)",
             "presence_penalty": "OpenAI semantics, -2..2; 0: off",
             "frequency_penalty": "OpenAI semantics, -2..2; 0: off"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-m", "--model", default=None, help="HDF5 file (in process) or served model name")
    ap.add_argument("-i", "--input", action="append", default=None, help="prompt text (repeatable)")
    ap.add_argument("-p", "--tokenizer", default=DEFAULT_TOKENIZER, help="hub id or folder with vocab.txt")
    ap.add_argument("-q", "--quant", action="store_true", help="int8 model")
    ap.add_argument("--url", default=None, help="Triton gRPC address host:port (serve mode)")
    for name, param in PARAMS.items():  # one flag per sampling input: --max-new-tokens, --top-k, ...
        ap.add_argument("--" + name.replace("_", "-"), type=param.type, default=None, help=FLAG_HELP.get(name))
    ap.add_argument("--stop", action="append", default=None, metavar="TEXT",
                    help="stop sequence (repeatable): generation ends right after it, and it is kept in the text")
    ap.add_argument("--stream", action="store_true", help="served: print tokens as they come, from the model's streaming twin "
                    "(gpt2 -> gpt2_stream, gpt2_int8 -> gpt2_int8_stream)")
    ap.add_argument("--timeout", type=float, default=300.0)
    return ap.parse_args(argv)


def note_lowered(asked: int, allowed: int, detail: str) -> None:
    """One note line on stderr when --max-new-tokens is lowered to what the model allows (as export.py's -l)."""
    print(f"generate.py: note: --max-new-tokens {asked} is more than the model allows ({detail}); using {allowed}",
          file=sys.stderr)


def run_local(a: argparse.Namespace, prompts: list[str], sampling: dict) -> list[str]:
    from lsgpt.engine.engine import Engine, SamplingParams
    from lsgpt.format import max_output_len

    tok = cached_tokenizer(a.tokenizer)
    engine = Engine.load(a.model, vocab=tok)  # the tokenizer's non-text special tokens are never generated
    if a.quant and not engine.config.quantized:
        raise SystemExit(f"-q given but {a.model} is an fp16 (Gpt) file")
    ids = [encode_prompt(tok, t) for t in prompts]
    sampling = check_sampling({**sampling, "stop": a.stop}, tok)
    cfg, asked = engine.config, sampling.get("max_new_tokens")
    n = max(map(len, ids))
    if asked is not None and 0 < max_output_len(cfg, n) - n < asked:
        note_lowered(asked, max_output_len(cfg, n) - n, f"at most {max_output_len(cfg, n) - n} new tokens after a "
                     f"{n}-token prompt, max_step {cfg.max_step}")
    t0 = time.perf_counter()
    rows = engine.generate(ids, SamplingParams(**sampling))
    dt = time.perf_counter() - t0
    print(f"engine ({'int8' if engine.config.quantized else 'fp16'}) time: {dt:.3f}s")
    return [decode(tok, r) for r in rows]


LIMIT = re.compile(r"at most (\d+) new tokens after (?:this|a) (\d+)-token prompt")


def _limit(e: InvalidRequest) -> int | None:
    """The served model's limit named in a strict_length refusal, or None for any other refusal."""
    m = LIMIT.search(str(e))
    return int(m[1]) if m else None


def run_served(a: argparse.Namespace, client: Client, prompts: list[str], sampling: dict) -> list[str] | None:
    """Served: each prompt's text, or None when streamed (printed as it came). A --max-new-tokens beyond what the
    model allows after a prompt is lowered to that, with a note: the server is asked to refuse it (strict_length),
    naming its limit, and the prompt is sent again with that."""
    noted = []

    def send(p: str | list[str], s: dict):
        if not a.stream:
            return client.generate(p, stop=a.stop, **s)
        for piece in client.stream(p, stop=a.stop, **s):
            print(piece, end="", flush=True)
        return ""

    def one(p: str):
        if sampling.get("max_new_tokens") is None:
            return send(p, sampling)
        try:
            return send(p, {**sampling, "strict_length": True})
        except InvalidRequest as e:
            allowed = _limit(e)
            if allowed is None:
                raise
            if not noted:
                note_lowered(sampling["max_new_tokens"], allowed, str(e).split("allows: ")[-1])
                noted.append(True)
            return send(p, {**sampling, "max_new_tokens": allowed})

    if not a.stream:
        try:  # together (Triton batches them); one by one only when one is over the limit
            return send(prompts, {**sampling, "strict_length": sampling.get("max_new_tokens") is not None})
        except InvalidRequest as e:
            if _limit(e) is None:
                raise
        return [one(p) for p in prompts]
    for p in prompts:
        print(decode(client.tok, client.encode(p)), end="", flush=True)
        one(p)
        print("\n" + "=" * 40)
    return None


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    prompts = a.input or DEFAULT_PROMPTS
    raw = {name: getattr(a, name) for name in PARAMS}
    if raw["top_k"] is None and any(raw[k] is not None for k in ("temperature", "top_p", "seed")):
        raw["top_k"] = 0  # asked to sample: from the whole distribution, not the file's greedy top_k (OpenAI-like)
    try:
        sampling = check_sampling(raw)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # a file path (an .hdf5/.h5 name, a path with '/', or an existing file) runs in process; a bare name is served
    local = a.model is not None and a.url is None and (
        a.model.endswith((".hdf5", ".h5")) or "/" in a.model or os.path.isfile(a.model))
    if local and not os.path.isfile(a.model):
        print(f"error: model file not found: {a.model} (a served model is named without a path or extension, "
              "e.g. -m gpt2_int8 --url localhost:8001)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        if local:
            texts = run_local(a, prompts, sampling)
        else:
            model = a.model or ("gpt2_int8" if a.quant else "gpt2")
            client = Client(a.url or "localhost:8001", model, a.tokenizer, timeout=a.timeout)
            texts = run_served(a, client, prompts, sampling)
            if texts is None:  # streamed
                print(f"time: {time.perf_counter() - t0:.3f}s")
                return 0
    except ClientError as e:
        print(("\n" if a.stream else "") + f"error: {e}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as e:  # a missing tokenizer, an unreadable model file: say what, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: a stream's request was stopped on the server (its iterator closed)
        print("\ninterrupted", file=sys.stderr)
        return 130
    for t in texts:
        print(t)
        print("=" * 40)
    print(f"time: {time.perf_counter() - t0:.3f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
