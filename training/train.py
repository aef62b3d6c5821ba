"""Train the embedded default ParScale model (issue 6). See training/README.md.

One command per stage (all read training/config.json and a work folder):
  python3 training/train.py golden                      # check the model code on fixtures/golden
  python3 training/train.py prepare --work W            # corpus split + BPE tokenizer + token ids
  python3 training/train.py stage1  --work W            # P=1 Qwen2 backbone
  python3 training/train.py stage2  --work W --parallel 2   # (and 4, 8): frozen backbone
  python3 training/train.py eval    --work W            # held-out loss for every P
  python3 training/train.py export  --work W --dest D   # Hugging Face layout (default-model/)
  python3 training/train.py all     --work W --out O    # everything above, in order
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import sysconfig
import tarfile
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import st_io  # noqa: E402
from bpe import bytes_to_unicode  # noqa: E402  (one byte-to-unicode table for the trainer and the encoder)
from parscale_torch import Cfg, ParScaleLM  # noqa: E402

T0 = time.time()
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def log(*a):
    print(f"[{time.time() - T0:7.1f}s]", *a, flush=True)


def load_cfg():
    with open(os.environ.get("PARSCALE_TRAIN_CONFIG", os.path.join(HERE, "config.json"))) as f:
        return json.load(f)


def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_all(s):
    random.seed(s)
    np.random.seed(s % (2**32))
    torch.manual_seed(s)


# ----------------------------------------------------------------------------- golden
def golden(_args=None):
    """Load fixtures/golden/* into ParScaleLM (float32) and compare with golden.json."""
    root = os.path.join(HERE, "..", "fixtures", "golden")
    ok = True
    for case in sorted(os.listdir(root)):
        d = os.path.join(root, case)
        if not os.path.isdir(d):
            continue
        hf, tensors = st_io.load_hf_folder(d)
        m = ParScaleLM(Cfg.from_hf(hf))
        sd = {k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}
        missing, unexpected = m.load_state_dict(sd, strict=False)
        assert not unexpected, unexpected
        assert not [k for k in missing if k != "lm_head.weight"], missing
        m = m.to(device()).float().eval()
        g = json.load(open(os.path.join(d, "golden.json")))
        ids = torch.tensor([g["logits"]["prompt_ids"]], device=device())
        with torch.no_grad():
            lg = m(ids)[0].cpu().numpy()
        ref = np.array(g["logits"]["values"], dtype=np.float32)
        err = float(np.abs(lg[:, : ref.shape[1]] - ref).max())
        # greedy path (full recompute), must match exactly
        gok = True
        for gr in g["greedy"]:
            seq = list(gr["prompt_ids"])
            for want in gr["new_ids"]:
                with torch.no_grad():
                    nxt = int(m(torch.tensor([seq], device=device()))[0, -1].argmax())
                if nxt != want:
                    gok = False
                    break
                seq.append(nxt)
        log(f"golden {case}: max|logit diff| {err:.2e}, greedy {'match' if gok else 'MISMATCH'}")
        ok &= err < 1e-3 and gok
    log("golden OK" if ok else "golden MISMATCH")
    return ok


# ----------------------------------------------------------------------------- prepare


def list_corpus(c, root=None):
    root = root or sysconfig.get_paths()["stdlib"]
    held = c["corpus"]["heldout_modules"]
    excl = c["corpus"]["excluded_tests_of_heldout"]
    train, heldout, skipped = [], [], []
    for d, ds, fs in os.walk(root):
        ds[:] = sorted(x for x in ds if x not in ("site-packages", "dist-packages", "__pycache__"))
        for f in sorted(fs):
            if not f.endswith(".py"):
                continue
            p = os.path.join(d, f)
            rel = os.path.relpath(p, root).replace(os.sep, "/")
            if os.path.getsize(p) > c["corpus"]["max_file_bytes"]:
                skipped.append(rel)
                continue
            try:
                text = open(p, encoding="utf-8").read()
            except (UnicodeDecodeError, OSError):
                skipped.append(rel)
                continue
            if any(rel == h or (h.endswith("/") and rel.startswith(h)) for h in held):
                heldout.append((rel, text))
            elif any(rel == h or (h.endswith("/") and rel.startswith(h)) for h in excl):
                skipped.append(rel)
            else:
                train.append((rel, text))
    return root, train, heldout, skipped


def build_tokenizer(c, texts, work):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = c["tokenizer"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=tk["bpe_vocab_size"],
        min_frequency=tk["min_frequency"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer, length=len(texts))
    raw = json.loads(tok.to_str())
    vocab = raw["model"]["vocab"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in raw["model"]["merges"]]
    # Re-number: ids 0-255 are the bytes in byte order (as in the golden fixtures),
    # then merged tokens in merge order, then the special tokens.
    b2u = bytes_to_unicode()
    new_vocab = {b2u[b]: b for b in range(256)}
    for m in merges:
        a, b = m.split(" ")
        t = a + b
        if t not in new_vocab:
            new_vocab[t] = len(new_vocab)
    assert len(new_vocab) == len(vocab), (len(new_vocab), len(vocab))
    n = len(new_vocab)
    added = [
        {"id": n + i, "content": s, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
        for i, s in enumerate(SPECIALS)
    ]
    bl = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": True}
    out = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": bl,
        "post_processor": None,
        "decoder": bl,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": new_vocab,
            "merges": merges,
        },
    }
    with open(os.path.join(work, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
    tcfg = {
        "tokenizer_class": "Qwen2Tokenizer",
        "model_max_length": c["model"]["context"],
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {
            str(a["id"]): {k: a[k] for k in ("content", "single_word", "lstrip", "rstrip", "normalized", "special")} for a in added
        },
    }
    with open(os.path.join(work, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tcfg, f, ensure_ascii=False, indent=2)
    # check: same pieces as the trained tokenizer, exact round trip
    tok2 = Tokenizer.from_file(os.path.join(work, "tokenizer.json"))
    for s in texts[:50]:
        e1, e2 = tok.encode(s), tok2.encode(s)
        assert e1.tokens == e2.tokens
        assert tok2.decode(e2.ids) == s
    e = tok2.encode("x = 1<|endoftext|>")
    assert e.ids[-1] == n, e.ids
    return tok2, {s: n + i for i, s in enumerate(SPECIALS)}


def prepare(args):
    c = load_cfg()
    work = args.work
    os.makedirs(work, exist_ok=True)
    seed_all(c["seed"])
    root, train, heldout, skipped = list_corpus(c, args.stdlib)
    log(f"stdlib {root}: {len(train)} training files, {len(heldout)} held-out files, {len(skipped)} skipped")
    assert heldout, "no held-out modules found"
    tok, sp = build_tokenizer(c, [t for _, t in train], work)
    eot = sp["<|endoftext|>"]
    log(f"tokenizer: {tok.get_vocab_size()} tokens; specials {sp}")
    rng = random.Random(c["seed"])
    order = list(range(len(train)))
    rng.shuffle(order)  # file order of the training streams
    sp_cfg = c["splits"]
    n_dev = max(1, int(len(order) * sp_cfg["dev_frac"]))
    n_s2 = int(len(order) * sp_cfg["stage2_frac"])
    parts = {"dev": order[:n_dev], "stage2": order[n_dev : n_dev + n_s2], "stage1": order[n_dev + n_s2 :]}

    def encode(files):
        encs = tok.encode_batch([t for _, t in files])
        ids, starts = [], []
        pos = 0
        for e in encs:
            starts.append(pos)
            ids.extend(e.ids)
            ids.append(eot)
            pos += len(e.ids) + 1
        return np.array(ids, dtype=np.uint16), np.array(starts, dtype=np.int64)

    split_tokens = {}
    for name, idx in parts.items():
        ids, starts = encode([train[i] for i in idx])
        np.save(os.path.join(work, f"{name}_ids.npy"), ids)
        np.save(os.path.join(work, f"{name}_starts.npy"), starts)
        split_tokens[name] = int(len(ids))
    he_ids, he_starts = encode(heldout)
    np.save(os.path.join(work, "heldout_ids.npy"), he_ids)
    nbytes_tr = sum(len(t.encode()) for _, t in train)
    nbytes_he = sum(len(t.encode()) for _, t in heldout)
    ntr = sum(split_tokens.values())
    log(f"train: {nbytes_tr/1e6:.2f} MB -> {ntr} tokens ({nbytes_tr/ntr:.2f} B/token), split {split_tokens}; "
        f"held-out: {nbytes_he/1e3:.1f} kB -> {len(he_ids)} tokens")
    # the held-out sample shipped with the model (fixtures/default-model/heldout.py)
    hs = c["corpus"]["heldout_sample"]
    src = dict(heldout)[hs["module"]]
    i = max(0, src.find(hs["start"]))
    lines, n = [], 0
    for ln in src[i:].splitlines(keepends=True):
        if n + len(ln) > hs["max_chars"]:
            break
        lines.append(ln)
        n += len(ln)
    sample = "".join(lines)
    with open(os.path.join(work, "heldout.py"), "w", encoding="utf-8") as f:
        f.write(sample)
    manifest = {
        "python": sys.version.split()[0],
        "stdlib": root,
        "train_files": len(train),
        "train_bytes": nbytes_tr,
        "train_tokens": ntr,
        "split_tokens": split_tokens,
        "split_files": {k: len(v) for k, v in parts.items()},
        "dev_files": sorted(train[i][0] for i in parts["dev"]),
        "stage2_files": sorted(train[i][0] for i in parts["stage2"]),
        "heldout_files": [r for r, _ in heldout],
        "heldout_bytes": nbytes_he,
        "heldout_tokens": int(len(he_ids)),
        "skipped_files": skipped,
        "heldout_sample_tokens": len(tok.encode(sample).ids),
        "tokenizer_size": tok.get_vocab_size(),
        "special_ids": sp,
    }
    with open(os.path.join(work, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)


# ----------------------------------------------------------------------------- training
def model_cfg(c, P, prefix_tokens):
    m = c["model"]
    return Cfg(
        vocab_size=m["vocab_size"], hidden_size=m["hidden_size"], intermediate_size=m["intermediate_size"],
        num_hidden_layers=m["num_hidden_layers"], num_attention_heads=m["num_attention_heads"],
        num_key_value_heads=m["num_key_value_heads"], rms_norm_eps=m["rms_norm_eps"], rope_theta=m["rope_theta"],
        tie_word_embeddings=m["tie_word_embeddings"], parscale_n=P, parscale_n_tokens=prefix_tokens,
        parscale_attn_smooth=c["stage2"]["attn_smooth"], dropout=c["model"].get("train_dropout", 0.0),
    )


class Batches:
    """Random windows of ctx+1 tokens from the training stream; a fraction starts at a file start."""

    def __init__(self, work, split, ctx, seed, doc_start_frac=0.25):
        ids = np.load(os.path.join(work, f"{split}_ids.npy")).astype(np.int64)
        starts = np.load(os.path.join(work, f"{split}_starts.npy"))
        n = len(ids)
        self.ids = torch.from_numpy(ids).to(device())
        self.starts = starts[starts < n - ctx - 1]
        self.ctx = ctx
        self.rng = np.random.default_rng(seed)
        self.doc_start_frac = doc_start_frac
        self.ar = torch.arange(ctx + 1, device=device())

    def get(self, b):
        s = self.rng.integers(0, len(self.ids) - self.ctx - 1, size=b)
        use_doc = self.rng.random(b) < self.doc_start_frac
        s[use_doc] = self.rng.choice(self.starts, size=int(use_doc.sum()))
        w = self.ids[torch.from_numpy(s).to(device())[:, None] + self.ar]
        return w[:, :-1], w[:, 1:]


def lr_at(progress, step, warmup, lr, min_frac):
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * (min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def round_bf16_(model):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())


@torch.no_grad()
def evaluate(model, ids: np.ndarray, window: int, batch: int = 32, autocast=False, max_windows=None):
    """Mean NLL (natural log) of every next token, in non-overlapping windows of `window`
    predictions (each window starts a fresh context at position 0)."""
    model.eval()
    t = torch.from_numpy(ids.astype(np.int64))
    wins = [t[i : i + window + 1] for i in range(0, len(t) - 1, window)]
    if max_windows:
        wins = wins[:max_windows]
    tot, n = 0.0, 0
    for L in sorted(set(len(w) for w in wins)):  # the last window may be short
        group = [w for w in wins if len(w) == L]
        for i in range(0, len(group), batch):
            x = torch.stack(group[i : i + batch]).to(device())
            with torch.autocast(device().type, dtype=torch.bfloat16, enabled=autocast):
                lg = model(x[:, :-1])
            lp = torch.log_softmax(lg.float(), -1)
            tot -= lp.gather(-1, x[:, 1:, None]).sum().item()
            n += x[:, 1:].numel()
    model.train()
    return tot / n, n


def train_loop(model, params, batches, sc, steps, lr, wd, tag, dev_ids, ctx=512, max_seconds=1e9):
    """AdamW, linear warm-up then cosine to min_lr_frac. Every sc["eval_every"] steps the loss
    on the dev split (files of the training corpus used for nothing else) is measured; the
    parameters with the lowest dev loss are kept, and training stops once it has not improved
    for sc["patience"] evaluations. A time guard ends the schedule early if needed."""
    dev = device()
    decay = [p for p in params if p.dim() >= 2 and wd > 0]
    nodecay = [p for p in params if not (p.dim() >= 2 and wd > 0)]
    groups = [{"params": decay, "weight_decay": wd}, {"params": nodecay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr, betas=tuple(sc.get("betas", (0.9, 0.95))), fused=dev.type == "cuda")
    t_start = time.time()
    model.train()
    step = 0
    stopped = "steps"
    dev_loss = lambda: evaluate(model, dev_ids, ctx, autocast=True, max_windows=sc.get("dev_windows", 96))[0]
    best = (dev_loss(), 0, [p.detach().clone() for p in params])
    log(f"{tag}: dev {best[0]:.4f} at step 0")
    bad = 0
    history = [(0, best[0])]
    while True:
        elapsed = time.time() - t_start
        progress = max(step / steps, elapsed / max_seconds)
        if progress >= 1.0:
            stopped = "steps" if step >= steps else "time guard"
            break
        cur = lr_at(progress, step, sc["warmup"], lr, sc["min_lr_frac"])
        for g in opt.param_groups:
            g["lr"] = cur
        x, y = batches.get(sc["batch"])
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            loss = model.loss(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, sc["grad_clip"])
        opt.step()
        step += 1
        if step % sc["eval_every"] == 0:
            dl = dev_loss()
            history.append((step, dl))
            mark = ""
            if dl < best[0]:
                best = (dl, step, [p.detach().clone() for p in params])
                bad = 0
                mark = " *"
            else:
                bad += 1
            log(f"{tag} step {step} train {loss.item():.4f} dev {dl:.4f}{mark} lr {cur:.2e} "
                f"({(time.time()-t_start)/step*1000:.0f} ms/step)")
            if bad >= sc["patience"]:
                stopped = "patience"
                break
    with torch.no_grad():
        for p, q in zip(params, best[2]):
            p.copy_(q)
    log(f"{tag}: {step} steps in {time.time()-t_start:.1f}s (ended by {stopped}); kept step {best[1]}, dev {best[0]:.4f}")
    return {"steps_run": step, "kept_step": best[1], "dev_loss": best[0], "ended_by": stopped,
            "seconds": round(time.time() - t_start, 1), "dev_history": history}


def stage1(args):
    c = load_cfg()
    sc = c["stage1"]
    seed_all(c["seed"] + 1)
    steps = args.steps or sc["steps"]
    model = ParScaleLM(model_cfg(c, 1, 0))
    model.init_backbone(c["seed"] + 1)
    model.to(device())
    n_params = sum(p.numel() for p in model.parameters())
    log(f"stage1: backbone {n_params/1e6:.3f}M parameters, {steps} steps x {sc['batch']}x{c['model']['context']} tokens")
    b = Batches(args.work, "stage1", c["model"]["context"], c["seed"] + 2, sc["doc_start_frac"])
    dev_ids = np.load(os.path.join(args.work, "dev_ids.npy"))
    info = train_loop(model, list(model.parameters()), b, sc, steps, sc["lr"], sc["weight_decay"], "stage1",
                      dev_ids, ctx=c["model"]["context"], max_seconds=args.max_seconds or sc["max_seconds"])
    round_bf16_(model)  # what ships is bf16; stage 2 and eval use exactly those values
    info["params"] = n_params
    torch.save({k: v.to(torch.bfloat16).cpu() for k, v in model.state_dict().items()}, os.path.join(args.work, "stage1.pt"))
    json.dump(info, open(os.path.join(args.work, "stage1.json"), "w"))


def load_backbone(c, work, P, prefix_tokens):
    model = ParScaleLM(model_cfg(c, P, prefix_tokens))
    sd = torch.load(os.path.join(work, "stage1.pt"))
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    assert not unexpected and all("prefix_" in k or "aggregate_layer" in k for k in missing), (missing, unexpected)
    return model.to(device())


@torch.no_grad()
def init_parscale(model, batches, P, T, seed):
    """Prefix k/v of stream p := the backbone's own (un-rotated) keys/values of T real tokens
    that end with <|endoftext|> (the end of some training file): at the start every stream
    reads like ordinary text after a file boundary, so P>1 starts close to P=1.
    Aggregation: layer 0 ~ N(0, 0.02), layer 2 = 0, so the streams start evenly mixed."""
    g = np.random.default_rng(seed)
    ends = batches.starts[batches.starts > T] - 1  # positions of <|endoftext|>
    pick = g.choice(ends, size=P, replace=False)
    snip = torch.stack([batches.ids[e - T + 1 : e + 1] for e in pick])
    probe = ParScaleLM(model_cfg_from(model.c, 1, 0)).to(device())
    probe.load_state_dict(model.backbone_state(), strict=False)
    caps = []
    for layer in probe.model.layers:
        layer.self_attn.capture = caps
    probe.eval()
    probe(snip)
    for L, layer in enumerate(model.model.layers):
        k, v = caps[L]
        layer.self_attn.prefix_k.copy_(k.float())
        layer.self_attn.prefix_v.copy_(v.float())
    if P > 1:
        gen = torch.Generator().manual_seed(seed)
        a0, a2 = model.model.aggregate_layer[0], model.model.aggregate_layer[2]
        a0.weight.copy_(torch.randn(a0.weight.shape, generator=gen) * 0.02)
        a0.bias.zero_()
        a2.weight.zero_()
        a2.bias.zero_()


def model_cfg_from(cfg: Cfg, P, T):
    d = dict(cfg.__dict__)
    d.update(parscale_n=P, parscale_n_tokens=T)
    return Cfg(**d)


def stage2(args):
    c = load_cfg()
    sc = c["stage2"]
    P = args.parallel
    T = sc["prefix_tokens"]
    seed = c["seed"] + 100 + P
    seed_all(seed)
    steps = args.steps or sc["steps"]
    model = load_backbone(c, args.work, P, T)
    for p in model.parameters():
        p.requires_grad_(False)
    b = Batches(args.work, "stage2", c["model"]["context"], seed, sc["doc_start_frac"])
    init_parscale(model, b, P, T, seed)
    params = model.parscale_parameters()
    for p in params:
        p.requires_grad_(True)
    n_new = sum(p.numel() for p in params)
    tag = f"stage2 P={P}" + (" (control: P=1 + prefix)" if P == 1 else "")
    dev_ids = np.load(os.path.join(args.work, "dev_ids.npy"))
    log(f"{tag}: {n_new} trainable parameters")
    ms = args.max_seconds or sc["max_seconds"][str(P)]
    info = train_loop(model, params, b, sc, steps, sc["lr"], 0.0, tag, dev_ids, ctx=c["model"]["context"], max_seconds=ms)
    round_bf16_(model)
    info["params"] = n_new
    torch.save({k: v.to(torch.bfloat16).cpu() for k, v in model.parscale_state().items()}, os.path.join(args.work, f"stage2_p{P}.pt"))
    json.dump(info, open(os.path.join(args.work, f"stage2_p{P}.json"), "w"))


def load_variant(c, work, P):
    T = c["stage2"]["prefix_tokens"] if P > 1 else 0
    model = load_backbone(c, work, P, T)
    if P > 1:
        sd = torch.load(os.path.join(work, f"stage2_p{P}.pt"))
        model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    return model


def eval_all(args):
    c = load_cfg()
    ctx = c["eval"]["window"]
    held = np.load(os.path.join(args.work, "heldout_ids.npy"))
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(args.work, "tokenizer.json"))
    sample = np.array(tok.encode(open(os.path.join(args.work, "heldout.py"), encoding="utf-8").read()).ids)
    res = {}
    Ps = [1] + [P for P in c["stage2"]["parallel"] if os.path.exists(os.path.join(args.work, f"stage2_p{P}.pt"))]
    for P in Ps:
        m = load_variant(c, args.work, P)
        nll, n = evaluate(m, held, ctx, batch=16)
        snll, sn = evaluate(m, sample, ctx, batch=1)
        res[P] = {"heldout_nll": nll, "heldout_tokens": n, "sample_nll": snll, "sample_tokens": sn}
        log(f"eval P={P}: held-out mean NLL {nll:.4f} over {n} tokens; heldout.py {snll:.4f} over {sn}")
        del m
    if os.path.exists(os.path.join(args.work, "stage2_p1.pt")):  # control: P=1 + trained prefix
        m = load_backbone(c, args.work, 1, c["stage2"]["prefix_tokens"])
        m.load_state_dict({k: v.float() for k, v in torch.load(os.path.join(args.work, "stage2_p1.pt")).items()}, strict=False)
        nll, n = evaluate(m, held, ctx, batch=16)
        res["1+prefix (control)"] = {"heldout_nll": nll, "heldout_tokens": n}
        log(f"eval control P=1 + 48-token prefix: {nll:.4f}")
    # greedy sample from each variant
    p = tok.encode("def fibonacci(n):").ids
    for P in Ps:
        m = load_variant(c, args.work, P).eval()
        seq = list(p)
        with torch.no_grad():
            for _ in range(48):
                nxt = int(m(torch.tensor([seq], device=device()))[0, -1].argmax())
                seq.append(nxt)
                if nxt >= tok.get_vocab_size() - 3:
                    break
        txt = tok.decode(seq)
        res[P]["greedy"] = txt
        log(f"greedy P={P}: {txt!r}")
    json.dump(res, open(os.path.join(args.work, "results.json"), "w"), indent=1)


# ----------------------------------------------------------------------------- export
def hf_config(c, P, vocab, sp):
    m = c["model"]
    d = {
        "architectures": ["Qwen2ForCausalLM" if P == 1 else "Qwen2ParScaleForCausalLM"],
        "model_type": "qwen2" if P == 1 else "qwen2_parscale",
        "vocab_size": m["vocab_size"],
        "hidden_act": "silu",
        "max_position_embeddings": m["context"],
        "initializer_range": 0.02,
        "rms_norm_eps": m["rms_norm_eps"],
        "rope_theta": m["rope_theta"],
        "use_cache": True,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": m["num_hidden_layers"],
        "attention_dropout": 0.0,
        "bos_token_id": sp["<|endoftext|>"],
        "eos_token_id": sp["<|im_end|>"],
        "torch_dtype": "bfloat16",
        "transformers_version": "4.46.0",
        "hidden_size": m["hidden_size"],
        "intermediate_size": m["intermediate_size"],
        "num_hidden_layers": m["num_hidden_layers"],
        "num_attention_heads": m["num_attention_heads"],
        "num_key_value_heads": m["num_key_value_heads"],
        "tie_word_embeddings": m["tie_word_embeddings"],
    }
    if P > 1:
        d.update({
            "parscale_n": P,
            "parscale_n_tokens": c["stage2"]["prefix_tokens"],
            "parscale_attn_smooth": c["stage2"]["attn_smooth"],
            "auto_map": {
                "AutoConfig": "configuration_qwen2_parscale.Qwen2ParScaleConfig",
                "AutoModelForCausalLM": "modeling_qwen2_parscale.Qwen2ParScaleForCausalLM",
            },
        })
    return d


def write_variant(d: str, config: dict, generation: dict, backbone: dict, own: dict | None):
    """One p{P}/ folder of the shipped layout: config, generation config, relative links to the
    shared backbone and tokenizer, the P-specific tensors (prefixes, aggregation) in
    model-parscale.safetensors (none at P = 1), and the index mapping every name to its file."""
    os.makedirs(d, exist_ok=True)
    json.dump(config, open(os.path.join(d, "config.json"), "w"), indent=2)
    with open(os.path.join(d, "generation_config.json"), "w") as f:
        json.dump(generation, f, indent=2)
        f.write("\n")
    for name in ("tokenizer.json", "tokenizer_config.json", "model-backbone.safetensors"):
        link = os.path.join(d, name)
        if os.path.lexists(link):
            os.remove(link)
        os.symlink(os.path.join("..", name), link)
    weight_map = {k: "model-backbone.safetensors" for k in backbone}
    size = sum(v.size * 2 for v in backbone.values())  # BF16
    own_file = os.path.join(d, "model-parscale.safetensors")
    if own:
        st_io.write(own_file, dict(sorted(own.items())), "BF16")
        weight_map.update({k: "model-parscale.safetensors" for k in own})
        size += sum(v.size * 2 for v in own.values())
    elif os.path.exists(own_file):
        os.remove(own_file)
    idx = {"metadata": {"total_size": int(size)}, "weight_map": dict(sorted(weight_map.items()))}
    json.dump(idx, open(os.path.join(d, "model.safetensors.index.json"), "w"), indent=2)


def export(args):
    """Write DEST/default-model/: model-backbone.safetensors once, p{P}/ folders that point to it."""
    c = load_cfg()
    man = json.load(open(os.path.join(args.work, "manifest.json")))
    sp = man["special_ids"]
    root = os.path.join(args.dest, "default-model")
    os.makedirs(root, exist_ok=True)
    bb = {k: v.float().numpy() for k, v in torch.load(os.path.join(args.work, "stage1.pt")).items()}
    st_io.write(os.path.join(root, "model-backbone.safetensors"), bb, "BF16")
    for f in ("tokenizer.json", "tokenizer_config.json", "heldout.py"):
        shutil.copy(os.path.join(args.work, f), os.path.join(root, f))
    Ps = [1] + [P for P in c["stage2"]["parallel"] if os.path.exists(os.path.join(args.work, f"stage2_p{P}.pt"))]
    for P in Ps:
        own = ({k: v.float().numpy() for k, v in torch.load(os.path.join(args.work, f"stage2_p{P}.pt")).items()}
               if P > 1 else None)
        write_variant(os.path.join(root, f"p{P}"), hf_config(c, P, None, sp),
                      {"bos_token_id": sp["<|endoftext|>"], "eos_token_id": [sp["<|im_end|>"], sp["<|endoftext|>"]], "do_sample": False},
                      bb, own)
    log(f"exported {root}")
    return root


# ----------------------------------------------------------------------------- all
def run_all(args):
    c = load_cfg()
    out = args.out
    os.makedirs(out, exist_ok=True)
    if torch.cuda.is_available():
        log("GPU:", torch.cuda.get_device_name(0), "torch", torch.__version__)
    if not golden():
        log("golden check failed; stopping")
        sys.exit(1)
    prepare(args)
    args.steps = None
    stage1(args)
    shutil.copy(os.path.join(args.work, "stage1.pt"), os.path.join(out, "stage1.pt"))  # kept only if a later step fails
    for P in [1] + c["stage2"]["parallel"]:
        args.parallel = P
        remaining = args.deadline - (time.time() - T0)
        if remaining < 60:
            log(f"skip stage2 P={P}: only {remaining:.0f}s left")
            continue
        args.max_seconds = min(c["stage2"]["max_seconds"][str(P)], remaining - 50)
        stage2(args)
    args.max_seconds = None
    eval_all(args)
    args.dest = args.work
    root = export(args)
    shutil.copy(os.path.join(root, "model-backbone.safetensors"), os.path.join(out, "model-backbone.safetensors"))
    with tarfile.open(os.path.join(out, "model-rest.tar"), "w") as tf:
        for name in sorted(os.listdir(root)):
            if name != "model-backbone.safetensors":
                tf.add(os.path.join(root, name), arcname=os.path.join("default-model", name))
    with tarfile.open(os.path.join(out, "meta.tar"), "w") as tf:
        for f in sorted(os.listdir(args.work)):
            if f.endswith(".json"):
                tf.add(os.path.join(args.work, f), arcname=f)
    os.remove(os.path.join(out, "stage1.pt"))
    log("done")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["golden", "prepare", "stage1", "stage2", "eval", "export", "all"])
    ap.add_argument("--work", default=os.path.join(HERE, "work"))
    ap.add_argument("--dest", default=os.path.join(HERE, "..", "fixtures"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--stdlib", default=None, help="prepare: stdlib folder (default: this python's)")
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--max-seconds", type=float, default=None)
    ap.add_argument("--deadline", type=float, default=520.0, help="all: seconds from start by which training must end")
    a = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 eval stays float32
    {"golden": golden, "prepare": prepare, "stage1": stage1, "stage2": stage2, "eval": eval_all, "export": export, "all": run_all}[a.cmd](a)


if __name__ == "__main__":
    main()
