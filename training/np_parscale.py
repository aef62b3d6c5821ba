"""Independent numpy float32 reference of the ParScale forward pass (golden README
arithmetic), used to check the golden fixtures and the shipped default model on a
machine without PyTorch.

  python3 training/np_parscale.py golden            # logits vs fixtures/golden/*/golden.json
  python3 training/np_parscale.py check DIR [...]   # shipped variants: names, shapes, eval, greedy
"""
from __future__ import annotations

import json
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import st_io  # noqa: E402


def rms(x, w, eps):
    return w * (x / np.sqrt((x * x).mean(-1, keepdims=True) + eps))


def silu(x):
    return x / (1.0 + np.exp(-x))


def forward(cfg: dict, t: dict, ids) -> np.ndarray:
    """Full forward of one sequence; returns logits [S, vocab_size] (float32)."""
    ids = np.asarray(ids, dtype=np.int64)
    S = len(ids)
    H = cfg["hidden_size"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = H // nh
    eps = cfg.get("rms_norm_eps", 1e-6)
    P = int(cfg.get("parscale_n", 1) or 1) if cfg.get("model_type") == "qwen2_parscale" else 1
    T = int(cfg.get("parscale_n_tokens", 0) or 0) if P > 1 else 0
    inv = 1.0 / (cfg.get("rope_theta", 10000.0) ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    ang = np.outer(np.arange(S, dtype=np.float64), inv)
    ang = np.concatenate([ang, ang], -1)
    cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)

    def rope(x):  # x [heads, S, hd]
        h = hd // 2
        rot = np.concatenate([-x[..., h:], x[..., :h]], -1)
        return x * cos + rot * sin

    emb = t["model.embed_tokens.weight"]
    x = np.repeat(emb[ids][None], P, axis=0)  # [P, S, H]
    causal = np.tril(np.ones((S, S), dtype=bool))
    for L in range(cfg["num_hidden_layers"]):
        pre = f"model.layers.{L}."
        out = np.empty_like(x)
        for p in range(P):
            h = rms(x[p], t[pre + "input_layernorm.weight"], eps)
            q = h @ t[pre + "self_attn.q_proj.weight"].T + t[pre + "self_attn.q_proj.bias"]
            k = h @ t[pre + "self_attn.k_proj.weight"].T + t[pre + "self_attn.k_proj.bias"]
            v = h @ t[pre + "self_attn.v_proj.weight"].T + t[pre + "self_attn.v_proj.bias"]
            q = rope(q.reshape(S, nh, hd).transpose(1, 0, 2))
            k = rope(k.reshape(S, nkv, hd).transpose(1, 0, 2))
            v = v.reshape(S, nkv, hd).transpose(1, 0, 2)
            mask = causal
            if T > 0:
                k = np.concatenate([t[pre + "self_attn.prefix_k"][p], k], 1)
                v = np.concatenate([t[pre + "self_attn.prefix_v"][p], v], 1)
                mask = np.concatenate([np.ones((S, T), dtype=bool), causal], 1)
            rep = nh // nkv
            k = np.repeat(k, rep, axis=0)
            v = np.repeat(v, rep, axis=0)
            sc = q @ k.transpose(0, 2, 1) / math.sqrt(hd)
            sc = np.where(mask[None], sc, -np.inf)
            sc = sc - sc.max(-1, keepdims=True)
            e = np.exp(sc)
            a = (e / e.sum(-1, keepdims=True)) @ v  # [nh, S, hd]
            a = a.transpose(1, 0, 2).reshape(S, nh * hd)
            y = x[p] + a @ t[pre + "self_attn.o_proj.weight"].T
            h2 = rms(y, t[pre + "post_attention_layernorm.weight"], eps)
            m = silu(h2 @ t[pre + "mlp.gate_proj.weight"].T) * (h2 @ t[pre + "mlp.up_proj.weight"].T)
            out[p] = y + m @ t[pre + "mlp.down_proj.weight"].T
        x = out
    x = rms(x, t["model.norm.weight"], eps)  # [P, S, H]
    if P > 1:
        feat = x.transpose(1, 2, 0).reshape(S, H * P)  # feature h*P + p
        z = silu(feat @ t["model.aggregate_layer.0.weight"].T + t["model.aggregate_layer.0.bias"])
        z = z @ t["model.aggregate_layer.2.weight"].T + t["model.aggregate_layer.2.bias"]
        z = z - z.max(-1, keepdims=True)
        w = np.exp(z)
        w = w / w.sum(-1, keepdims=True)
        s = cfg.get("parscale_attn_smooth", 0.01)
        w = w * (1 - s) + s / P  # [S, P]
        x = (x.transpose(1, 0, 2) * w[:, :, None]).sum(1)
    else:
        x = x[0]
    head = t["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings") else t["lm_head.weight"]
    return (x @ head.T).astype(np.float32)


def mean_nll(cfg, t, ids, window=None):
    """Mean NLL (natural log) of predicting ids[1:], in windows of `window` predictions."""
    ids = list(ids)
    tot, n = 0.0, 0
    W = window or len(ids)
    i = 0
    while i + 1 < len(ids):
        chunk = ids[i : i + W + 1]
        lg = forward(cfg, t, chunk[:-1]).astype(np.float64)
        lg = lg - lg.max(-1, keepdims=True)
        lp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
        tot -= lp[np.arange(len(chunk) - 1), chunk[1:]].sum()
        n += len(chunk) - 1
        i += W
    return tot / n, n


def golden(root):
    ok = True
    for case in sorted(os.listdir(root)):
        d = os.path.join(root, case)
        if not os.path.isdir(d):
            continue
        cfg, t = st_io.load_hf_folder(d)
        g = json.load(open(os.path.join(d, "golden.json")))
        lg = forward(cfg, t, g["logits"]["prompt_ids"])
        ref = np.array(g["logits"]["values"], dtype=np.float32)
        err = float(np.abs(lg[:, : ref.shape[1]] - ref).max())
        nll, _ = mean_nll(cfg, t, list(g["eval"]["text"].encode("utf-8")))
        print(f"{case}: max|logit diff| {err:.2e}  eval nll {nll:.6f} vs {g['eval']['mean_nll']:.6f}")
        ok &= err < 1e-3 and abs(nll - g["eval"]["mean_nll"]) < 1e-4
    print("golden OK" if ok else "golden MISMATCH")
    return ok


def greedy(cfg, t, ids, n, stop=()):
    ids = list(ids)
    new = []
    for _ in range(n):
        nxt = int(np.argmax(forward(cfg, t, ids)[-1]))
        ids.append(nxt)
        new.append(nxt)
        if nxt in stop:
            break
    return new


def check(folders):
    """Parse each shipped variant folder, print its eval on heldout.py and a greedy sample."""
    try:
        from tokenizers import Tokenizer  # optional
    except ImportError:
        Tokenizer = None
    for d in folders:
        cfg, t = st_io.load_hf_folder(d)
        print(f"== {d}: {cfg['model_type']} P={cfg.get('parscale_n', 1)} tensors={len(t)}")
        if Tokenizer is None:
            continue
        tok = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
        held = open(os.path.join(os.path.dirname(d.rstrip("/")), "heldout.py")).read()
        ids = tok.encode(held).ids
        nll, n = mean_nll(cfg, t, ids, window=cfg["max_position_embeddings"])
        print(f"   heldout.py: {n} predicted tokens, mean NLL {nll:.4f}")
        p = tok.encode("def fibonacci(n):").ids
        eos = json.load(open(os.path.join(d, "generation_config.json")))["eos_token_id"]
        new = greedy(cfg, t, p, 32, stop=set(eos))
        print("   greedy:", repr("def fibonacci(n):" + tok.decode(new)))


if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    if sys.argv[1] == "golden":
        sys.exit(0 if golden(os.path.join(here, "..", "fixtures", "golden")) else 1)
    elif sys.argv[1] == "check":
        check(sys.argv[2:])
