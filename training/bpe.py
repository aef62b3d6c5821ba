"""Encode text with a byte-level BPE tokenizer.json (the default model's).

`load(path)` returns encode_batch(texts) -> list of id lists. It uses the `tokenizers` package
when present (the GPU machine has 0.23.2) and otherwise this file's pure-Python encoder, so
the CPU test of training/ runs on a machine without it (needs the `regex` module for \\p{L}).
The pure-Python encoder handles what our tokenizer.json uses: no normalizer, ByteLevel
pre-tokenizer with the GPT-2 pattern, BPE merges by rank; special tokens in the text are not
matched (the training text never contains them; ids are appended by the caller).
"""
from __future__ import annotations

import functools
import json
import sys

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


class PurePythonBPE:
    def __init__(self, path: str):
        import regex

        d = json.load(open(path, encoding="utf-8"))
        m = d["model"]
        self.vocab = m["vocab"]
        merges = [tuple(x.split(" ")) if isinstance(x, str) else tuple(x) for x in m["merges"]]
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        self.b2u = bytes_to_unicode()
        self.pat = regex.compile(GPT2_PATTERN)
        self.cache: dict[str, list[int]] = {}

    def _word(self, w: str) -> list[int]:
        hit = self.cache.get(w)
        if hit is not None:
            return hit
        parts = list(w)
        while len(parts) > 1:
            best, at = None, -1
            for i in range(len(parts) - 1):
                r = self.ranks.get((parts[i], parts[i + 1]))
                if r is not None and (best is None or r < best):
                    best, at = r, i
            if best is None:
                break
            a, b = parts[at], parts[at + 1]
            merged, i = [], 0
            while i < len(parts):  # merge every occurrence of the best pair, left to right
                if i < len(parts) - 1 and parts[i] == a and parts[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        ids = [self.vocab[p] for p in parts]
        if len(self.cache) < 500_000:
            self.cache[w] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        out = []
        for piece in self.pat.findall(text):
            out.extend(self._word("".join(self.b2u[b] for b in piece.encode("utf-8"))))
        return out

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]


@functools.lru_cache(maxsize=None)
def load(path: str):
    try:
        from tokenizers import Tokenizer
    except ImportError:
        print("bpe: `tokenizers` not installed; using the pure-Python encoder (slow)", file=sys.stderr, flush=True)
        return PurePythonBPE(path).encode_batch
    tok = Tokenizer.from_file(path)
    return lambda texts: [e.ids for e in tok.encode_batch(list(texts))]
