"""Recompute the held-out table from the shipped files alone (CPU is fine).

  python3 training/verify_shipped.py --stdlib /path/to/python3.11 [--model fixtures/default-model]

Encodes the held-out modules named in training/config.json with the shipped tokenizer
(files in sorted path order, each followed by <|endoftext|>, exactly as `train.py prepare`
does), loads every p{P}/ folder through its model.safetensors.index.json, and prints the mean
NLL per token in windows of 512 predictions, float32.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import st_io  # noqa: E402
from parscale_torch import Cfg, ParScaleLM  # noqa: E402
from train import evaluate, list_corpus, load_cfg  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--stdlib", required=True)
    ap.add_argument("--model", default=os.path.join(HERE, "..", "fixtures", "default-model"))
    a = ap.parse_args()
    from tokenizers import Tokenizer

    c = load_cfg()
    tok = Tokenizer.from_file(os.path.join(a.model, "tokenizer.json"))
    eot = tok.token_to_id("<|endoftext|>")
    _, _, heldout, _ = list_corpus(c, a.stdlib)
    ids = []
    for _, text in heldout:
        ids += tok.encode(text).ids + [eot]
    ids = np.array(ids, dtype=np.int64)
    print(f"{len(heldout)} held-out files, {len(ids)} tokens")
    for name in sorted(os.listdir(a.model)):
        d = os.path.join(a.model, name)
        if not (os.path.isdir(d) and name.startswith("p")):
            continue
        hf, t = st_io.load_hf_folder(d)
        m = ParScaleLM(Cfg.from_hf(hf))
        m.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in t.items()}, strict=True)
        torch.set_num_threads(os.cpu_count() or 1)
        nll, n = evaluate(m, ids, c["eval"]["window"], batch=8)
        print(f"{name}: held-out mean NLL {nll:.4f} over {n} predicted tokens")


if __name__ == "__main__":
    main()
