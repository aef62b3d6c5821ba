"""Issue 22: a ParScale family trained from scratch with dynamic P on one shared backbone.

One Qwen2 backbone is shared by five arms: p1 (the plain backbone, shipped as P=1), p2, p4, p8
(each with its own prefix_k/prefix_v and aggregate_layer) and control (P=1 plus its own
48-token prefix; not shipped). Training steps go round-robin over the arms, so every arm
sees the same number of tokens and the backbone learns to serve every P. See training/README.md.

  python3 training/dynamic.py prepare --corpus C.tar.xz --work W      # tokenize (once, for both sizes)
  python3 training/dynamic.py train   --work W --size small --out O   # train + eval: O/small/{train.log,results.json,weights-*.safetensors}
  python3 training/dynamic.py eval    --work W --size small --out O   # eval again from O/small/weights-*
  python3 training/dynamic.py finish  --results O --size small        # export fixtures/default-model, records, law fit, chart
  python3 training/dynamic.py cpu-test                                # the whole pipeline on a tiny config, on CPU

Every setting is in config.json "dynamic" (sizes "small", "large", and "tiny" for the CPU test).
"""
from __future__ import annotations

import argparse
import copy
import io
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tarfile
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import bpe  # noqa: E402
import st_io  # noqa: E402
from parscale_torch import Cfg, ParScaleLM  # noqa: E402
from train import Batches, evaluate, hf_config, lr_at, seed_all, write_variant  # noqa: E402

ARM_P = {"p1": 1, "p2": 2, "p4": 4, "p8": 8, "control": 1}
SHIPPED_ARMS = ["p1", "p2", "p4", "p8"]
TOKENIZER = os.path.join(ROOT, "fixtures", "default-model", "tokenizer.json")
SAMPLE = os.path.join(ROOT, "fixtures", "default-model", "heldout.py")
SHARD_BYTES = 16_000_000  # files back from the device machine: at most 16 MiB each
T0 = time.time()
_log_file = None


_tag = ""  # the size, so two trainers' lines can be told apart in one console


def log(*a):
    line = f"[{time.time() - T0:7.1f}s]{_tag} " + " ".join(str(x) for x in a)
    print(line, flush=True)
    if _log_file:
        _log_file.write(line + "\n")
        _log_file.flush()


def load_cfg():
    with open(os.environ.get("PARSCALE_TRAIN_CONFIG", os.path.join(HERE, "config.json"))) as f:
        return json.load(f)


def dev():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def size_settings(c, size, recipe=None):
    """The dynamic section with one size's overrides applied, then the recipe's (if any)."""
    d = {k: v for k, v in c["dynamic"].items() if k not in ("sizes", "corpus", "optim", "recipes")}
    d.update(c["dynamic"]["optim"])
    d.update(c["dynamic"]["sizes"][size])
    if recipe:
        d.update({k: v for k, v in c["dynamic"]["recipes"][recipe].items() if k != "about"})
    d["size"] = size
    d["recipe"] = recipe or "base"
    return d


def special_ids():
    tj = json.load(open(TOKENIZER, encoding="utf-8"))
    return {a["content"]: a["id"] for a in tj["added_tokens"]}


# ----------------------------------------------------------------------------- prepare
def prepare(args):
    """Tokenize the corpus archive into WORK/{train,dev,heldout,heldout2,sample}_ids.npy."""
    from train import golden

    if not golden():  # the model code must still match fixtures/golden on this machine's torch
        sys.exit("dynamic.py: golden check failed")
    c = load_cfg()
    os.makedirs(args.work, exist_ok=True)
    texts: dict[str, list] = {"train": [], "dev": [], "heldout": [], "heldout2": []}
    manifest = {}
    with tarfile.open(args.corpus, "r:*") as tf:
        for m in tf:
            if not m.isfile():
                continue
            data = tf.extractfile(m).read()
            if m.name == "manifest.json":
                manifest = json.loads(data)
                continue
            split, name = m.name.split("/", 1)
            texts[split].append((name, data.decode("utf-8")))
    log(f"read {args.corpus}: " + ", ".join(f"{k} {len(v)} files" for k, v in texts.items()))
    rng = random.Random(c["seed"] + 23)
    rng.shuffle(texts["train"])  # file order of the training stream (windows are drawn at random anyway)
    if args.limit_mb:  # CPU test: a slice of the training files
        keep, n = [], 0
        for f in texts["train"]:
            if n > args.limit_mb * 1e6:
                break
            keep.append(f)
            n += len(f[1])
        texts["train"] = keep
        texts["dev"] = texts["dev"][:20]
    encode = bpe.load(TOKENIZER)
    eot = special_ids()["<|endoftext|>"]
    stats = {}
    for split, files in texts.items():
        t = time.time()
        ids, starts, pos = [], [], 0
        chunk = 2000
        for i in range(0, len(files), chunk):
            for e in encode([txt for _, txt in files[i : i + chunk]]):
                starts.append(pos)
                ids.append(np.asarray(e, dtype=np.uint16))
                ids.append(np.array([eot], dtype=np.uint16))
                pos += len(e) + 1
        arr = np.concatenate(ids) if ids else np.zeros(0, np.uint16)
        np.save(os.path.join(args.work, f"{split}_ids.npy"), arr)
        np.save(os.path.join(args.work, f"{split}_starts.npy"), np.array(starts, dtype=np.int64))
        nbytes = sum(len(txt.encode()) for _, txt in files)
        stats[split] = {"files": len(files), "bytes": nbytes, "tokens": int(len(arr)),
                        "bytes_per_token": round(nbytes / max(1, len(arr)), 3)}
        log(f"{split}: {len(files)} files, {nbytes / 1e6:.1f} MB -> {len(arr)} tokens ({time.time() - t:.1f}s)")
    sample = np.asarray(encode([open(SAMPLE, encoding="utf-8").read()])[0], dtype=np.uint16)
    np.save(os.path.join(args.work, "sample_ids.npy"), sample)
    stats["sample"] = {"file": "fixtures/default-model/heldout.py", "tokens": int(len(sample))}
    info = {"corpus": os.path.basename(args.corpus), "limit_mb": args.limit_mb, "splits": stats,
            "packages": manifest.get("packages", {}), "stdlib": manifest.get("stdlib", {})}
    json.dump(info, open(os.path.join(args.work, "prepare.json"), "w"), indent=1)


# ----------------------------------------------------------------------------- the family
def model_cfg(c, s, P, prefix_tokens):
    m = c["model"]
    return Cfg(
        vocab_size=m["vocab_size"], hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
        num_hidden_layers=s["num_hidden_layers"], num_attention_heads=s["num_attention_heads"],
        num_key_value_heads=s["num_key_value_heads"], rms_norm_eps=m["rms_norm_eps"], rope_theta=m["rope_theta"],
        tie_word_embeddings=True, parscale_n=P, parscale_n_tokens=prefix_tokens,
        parscale_attn_smooth=s["attn_smooth"], dropout=0.0,  # under-fit regime: no dropout
    )


def share_backbone(arm: ParScaleLM, backbone: ParScaleLM):
    """Make `arm` use the backbone's modules; only its prefixes and aggregate_layer stay its own."""
    arm.model.embed_tokens = backbone.model.embed_tokens
    arm.model.norm = backbone.model.norm
    for a, b in zip(arm.model.layers, backbone.model.layers):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(a.self_attn, name, getattr(b.self_attn, name))
        a.mlp = b.mlp
        a.input_layernorm = b.input_layernorm
        a.post_attention_layernorm = b.post_attention_layernorm


def build_family(c, s, seed) -> torch.nn.ModuleDict:
    backbone = ParScaleLM(model_cfg(c, s, 1, 0))
    backbone.init_backbone(seed)
    family = torch.nn.ModuleDict({"p1": backbone})
    g = torch.Generator().manual_seed(seed + 1)
    for name in s["arms"]:
        if name == "p1":
            continue
        arm = ParScaleLM(model_cfg(c, s, ARM_P[name], s["prefix_tokens"]))
        share_backbone(arm, backbone)
        with torch.no_grad():
            for pname, p in arm.named_parameters():
                if "prefix_" in pname:
                    p.copy_(torch.randn(p.shape, generator=g) * s["prefix_init_std"])
                elif "aggregate_layer" in pname:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02 if p.dim() == 2 else torch.zeros(p.shape))
        family[name] = arm
    if s.get("nested_prefixes"):
        # P = 2 and 4 use the first 2 and 4 of P = 8's prefixes: the larger P adds streams to the
        # smaller one's instead of replacing them (the control keeps its own prefix)
        nested = sorted((n for n in family if n != "control" and ARM_P[n] > 1), key=lambda n: ARM_P[n])
        largest = family[nested[-1]]
        for name in nested[:-1]:
            for small, large in zip(family[name].model.layers, largest.model.layers):
                small.self_attn.nest_prefixes_in(large.self_attn)
    return family


def family_state(family) -> dict:
    """Flat name -> tensor: 'backbone/<hf name>' once, '<arm>/<hf name>' for each arm's own tensors."""
    out = {f"backbone/{k}": v for k, v in family["p1"].state_dict().items()}
    for name, arm in family.items():
        if name != "p1":
            out.update({f"{name}/{k}": v for k, v in arm.parscale_state().items()})
    return out


def load_family_state(family, tensors: dict):
    bb = {k.split("/", 1)[1]: torch.from_numpy(np.array(v)) for k, v in tensors.items() if k.startswith("backbone/")}
    family["p1"].load_state_dict(bb, strict=True)
    for name, arm in family.items():
        if name != "p1":
            own = {k.split("/", 1)[1]: torch.from_numpy(np.array(v)) for k, v in tensors.items() if k.startswith(name + "/")}
            nested = {f"model.layers.{i}.self_attn.{k}" for i, layer in enumerate(arm.model.layers)
                      if layer.self_attn.nested_in is not None for k in ("prefix_k", "prefix_v")}
            # nested prefixes are the larger arm's, loaded with it; the saved copies are only its slices
            missing, unexpected = arm.load_state_dict({k: v for k, v in own.items() if k not in nested}, strict=False)
            assert not unexpected and all("prefix_" not in k and "aggregate_layer" not in k for k in missing), (name, unexpected)


def non_embedding_params(family) -> int:
    return sum(p.numel() for n, p in family["p1"].named_parameters() if "embed_tokens" not in n)


def write_shards(out, tensors: dict):
    """bf16 safetensors shards of at most SHARD_BYTES each."""
    for f in os.listdir(out):
        if f.startswith("weights-") and f.endswith(".safetensors"):
            os.remove(os.path.join(out, f))
    shard, size, k = {}, 0, 1
    for name, t in tensors.items():
        nbytes = t.numel() * 2
        if shard and size + nbytes > SHARD_BYTES - 100_000:
            st_io.write(os.path.join(out, f"weights-{k}.safetensors"), shard, "BF16")
            shard, size, k = {}, 0, k + 1
        shard[name] = t.detach().float().cpu().numpy()
        size += nbytes
    st_io.write(os.path.join(out, f"weights-{k}.safetensors"), shard, "BF16")
    return k


def read_shards(folder) -> dict:
    tensors = {}
    for f in sorted(os.listdir(folder)):
        if f.startswith("weights-") and f.endswith(".safetensors"):
            tensors.update(st_io.read(os.path.join(folder, f)))
    return tensors


# ----------------------------------------------------------------------------- train
def train(args):
    global _log_file, _tag
    c = load_cfg()
    s = size_settings(c, args.size, args.recipe)
    _tag = f" {args.size}"
    out = os.path.join(args.out, args.size)
    os.makedirs(out, exist_ok=True)
    _log_file = open(os.path.join(out, "train.log"), "w")
    d = dev()
    seed = c["seed"] + 2200 + sum(map(ord, args.size)) + s.get("seed_offset", 0)  # a recipe may redraw everything
    seed_all(seed)
    if d.type == "cuda":
        log("GPU:", torch.cuda.get_device_name(0), "torch", torch.__version__)
        torch.backends.cuda.matmul.allow_tf32 = True  # training only; eval switches it off
        torch.backends.cudnn.allow_tf32 = True
    ctx = s["context"]
    family = build_family(c, s, seed).to(d)
    params = list(family.parameters())  # unique: shared modules appear once
    n_backbone = sum(p.numel() for p in family["p1"].parameters())
    log(f"size {args.size}: backbone {n_backbone:,} parameters ({non_embedding_params(family):,} non-embedding); "
        + ", ".join(f"{a} +{sum(p.numel() for p in family[a].parscale_parameters()):,}" for a in s["arms"] if a != "p1"))
    backbone_ids = {id(p) for p in family["p1"].parameters()}
    decay = [p for p in params if id(p) in backbone_ids and p.dim() >= 2]
    no_decay = [p for p in params if not (id(p) in backbone_ids and p.dim() >= 2)]
    fused = {"fused": True} if d.type == "cuda" and torch.__version__ >= "2" else {}
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": s["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=s["lr"], betas=tuple(s["betas"]), **fused)
    data = Batches(args.work, "train", ctx, seed + 1, s["doc_start_frac"])
    windows = {}
    for i, a in enumerate(s["arms"]):  # one view of the token stream per arm, each with its own seeded draw
        windows[a] = copy.copy(data)
        windows[a].rng = np.random.default_rng(seed + 10 + i)
    dev_ids = np.load(os.path.join(args.work, "dev_ids.npy"))
    train_tokens = len(data.ids)
    B = s["batch"]
    max_steps = int(s["max_epochs"] * train_tokens / (B * ctx))  # counts every arm's step: backbone epochs
    if args.max_steps:  # a fixed step count (a second size trained on the tokens the first one saw)
        max_steps = min(max_steps, args.max_steps)
    max_seconds = args.max_seconds or s["max_seconds"]
    if args.end_by:  # an absolute deadline for the whole call: leave time for the final eval
        max_seconds = min(max_seconds, args.end_by - time.time() - s["eval_reserve_seconds"])
    # the arms' turns, repeated: every arm once by default; a recipe's "schedule" gives some arms more turns
    schedule = s.get("schedule") or s["arms"]
    unknown = sorted(set(schedule) - set(s["arms"]))
    if unknown or set(s["arms"]) - set(schedule):
        sys.exit(f"config.json: schedule {schedule} must name every arm of {s['arms']} and nothing else (unknown: {unknown})")
    log(f"train stream {train_tokens:,} tokens; batch {B}x{ctx}; at most {max_steps} steps "
        f"({s['max_epochs']} backbone epochs) or {max_seconds:.0f}s; arms {s['arms']}, turns {schedule} round-robin")
    loss_fn = {a: family[a].loss for a in s["arms"]}
    if args.compile:
        loss_fn = {a: torch.compile(f) for a, f in loss_fn.items()}

    def dev_losses():
        return {a: evaluate(family[a], dev_ids, ctx, batch=16, autocast=d.type == "cuda",
                            max_windows=s["dev_windows"])[0] for a in s["arms"]}

    history, recent = [], {a: [] for a in s["arms"]}
    dl = dev_losses()
    best = (float(np.mean(list(dl.values()))), 0, None)
    history.append({"step": 0, "seconds": 0.0, "dev": dl})
    log(f"step 0 dev " + " ".join(f"{a} {v:.4f}" for a, v in dl.items()))
    step, t_start, ended_by = 0, time.time(), "steps"
    while True:
        elapsed = time.time() - t_start
        progress = max(step / max_steps, elapsed / max_seconds)
        if progress >= 1.0:
            ended_by = "steps (epoch cap)" if step >= max_steps else "time guard"
            break
        lr = lr_at(progress, step, s["warmup"], s["lr"], s["min_lr_frac"])
        for g in opt.param_groups:
            g["lr"] = lr
        arm = schedule[step % len(schedule)]
        x, y = windows[arm].get(B)
        rows = max(1, min(B, s["max_stream_rows"] // ARM_P[arm]))  # micro-batches bound memory at large P
        opt.zero_grad(set_to_none=True)  # arms not in this step get no gradient: AdamW leaves them alone
        total = 0.0
        for i in range(0, B, rows):
            with torch.autocast(d.type, dtype=torch.bfloat16, enabled=d.type == "cuda"):
                loss = loss_fn[arm](x[i : i + rows], y[i : i + rows]) * (min(rows, B - i) / B)
            loss.backward()
            total = total + loss.detach()
        torch.nn.utils.clip_grad_norm_(params, s["grad_clip"])
        opt.step()
        recent[arm].append(total)
        step += 1
        if step % s["eval_every"] == 0:
            dl = dev_losses()
            mean = float(np.mean(list(dl.values())))
            tr = {a: float(torch.stack(v).mean()) for a, v in recent.items() if v}
            recent = {a: [] for a in s["arms"]}
            el = time.time() - t_start
            history.append({"step": step, "seconds": round(el, 1), "lr": lr, "train": tr, "dev": dl})
            mark = ""
            if mean < best[0]:
                best = (mean, step, {k: v.detach().clone() for k, v in family_state(family).items()})
                mark = " *"
            log(f"step {step} ({step * B * ctx / train_tokens:.2f} ep, {el:.0f}s, "
                f"{step * B * ctx / el / 1e3:.0f}k tok/s) lr {lr:.2e} dev " + " ".join(f"{a} {v:.4f}" for a, v in dl.items())
                + f" mean {mean:.4f}{mark}")
    seconds = time.time() - t_start
    dl = dev_losses()
    mean = float(np.mean(list(dl.values())))
    history.append({"step": step, "seconds": round(seconds, 1), "dev": dl})
    if mean < best[0] or best[2] is None:
        best = (mean, step, None)
    else:
        load_family_state(family, {k: v.float().cpu().numpy() for k, v in best[2].items()})
        family.to(d)
    log(f"trained {step} steps in {seconds:.0f}s (ended by {ended_by}); kept step {best[1]} (mean dev {best[0]:.4f})")
    with torch.no_grad():  # what ships is bf16: every evaluation below uses exactly those values
        for p in params:
            p.copy_(p.to(torch.bfloat16).float())
    n_shards = write_shards(out, family_state(family))
    results = {
        "size": args.size, "settings": s, "device": torch.cuda.get_device_name(0) if d.type == "cuda" else "cpu",
        "torch": torch.__version__, "backbone_params": n_backbone, "non_embedding_params": non_embedding_params(family),
        "arm_params": {a: sum(p.numel() for p in family[a].parscale_parameters()) for a in s["arms"] if a != "p1"},
        "steps": step, "steps_per_arm": {a: sum(1 for i in range(step) if schedule[i % len(schedule)] == a) for a in s["arms"]}, "kept_step": best[1], "seconds": round(seconds, 1),
        "ended_by": ended_by, "tokens_seen_backbone": step * B * ctx, "tokens_seen_per_arm": step * B * ctx / len(s["arms"]),
        "backbone_epochs": step * B * ctx / train_tokens, "history": history, "weight_shards": n_shards,
        "data": json.load(open(os.path.join(args.work, "prepare.json"))),
    }
    json.dump(results, open(os.path.join(out, "results.json"), "w"), indent=1)  # kept if the eval is cut off
    results["eval"] = final_eval(family, s, args.work)
    json.dump(results, open(os.path.join(out, "results.json"), "w"), indent=1)
    log(f"wrote {out}: results.json, train.log, {n_shards} weight shard(s)")


@torch.no_grad()
def final_eval(family, s, work):
    """Held-out NLL per arm, float32 (no TF32) on the bf16-rounded weights, windows of eval_window."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    family.float()
    sets = {"heldout": "heldout_ids.npy", "heldout2": "heldout2_ids.npy", "dev": "dev_ids.npy", "sample": "sample_ids.npy"}
    res = {}
    for a in s["arms"]:
        res[a] = {}
        for name, f in sets.items():
            ids = np.load(os.path.join(work, f))
            cap = s.get("max_eval_windows") or (200 if name == "dev" else None)
            nll, n = evaluate(family[a], ids, s["eval_window"], batch=16, max_windows=cap)
            res[a][name] = {"nll": nll, "tokens": n}
        res[a]["greedy"] = greedy(family[a], "def fibonacci(n):", 48)
        log(f"eval {a}: " + " ".join(f"{k} {v['nll']:.4f} ({v['tokens']} tok)" for k, v in res[a].items() if k != "greedy"))
    for name in sets:
        order = [res[a][name]["nll"] for a in SHIPPED_ARMS if a in res]
        ok = all(x > y for x, y in zip(order, order[1:]))
        margin = res["control"][name]["nll"] - res["p8"][name]["nll"] if "control" in res and "p8" in res else None
        log(f"{name}: P1>P2>P4>P8 {'yes' if ok else 'NO'}; control - P8 = {margin:+.4f}" if margin is not None else name)
    return res


def greedy(model, prompt, n):
    encode = bpe.load(TOKENIZER)
    seq = list(encode([prompt])[0])
    vocab = json.load(open(TOKENIZER, encoding="utf-8"))
    inv = {i: t for t, i in vocab["model"]["vocab"].items()}
    u2b = {v: k for k, v in bpe.bytes_to_unicode().items()}
    model.eval()
    for _ in range(n):
        nxt = int(model(torch.tensor([seq], device=dev()))[0, -1].argmax())
        if nxt not in inv:  # a special token ends it
            break
        seq.append(nxt)
    return bytes(u2b[ch] for i in seq for ch in inv[i]).decode("utf-8", errors="replace")


def eval_only(args):
    c = load_cfg()
    s = size_settings(c, args.size, args.recipe)
    folder = os.path.join(args.out, args.size)
    family = build_family(c, s, 0)
    load_family_state(family, read_shards(folder))
    res = final_eval(family.to(dev()), s, args.work)
    json.dump(res, open(os.path.join(folder, "eval.json"), "w"), indent=1)


# ----------------------------------------------------------------------------- export + finish
def export(c, s, tensors: dict, dest: str):
    """Write DEST/default-model/ in the shipped layout: model-backbone.safetensors once, p{P}/ per P."""
    root = os.path.join(dest, "default-model")
    os.makedirs(root, exist_ok=True)
    sp = special_ids()
    bb = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("backbone/")}
    st_io.write(os.path.join(root, "model-backbone.safetensors"), dict(sorted(bb.items())), "BF16")
    if os.path.abspath(root) != os.path.dirname(TOKENIZER):
        for f in ("tokenizer.json", "tokenizer_config.json", "heldout.py"):
            shutil.copy(os.path.join(os.path.dirname(TOKENIZER), f), os.path.join(root, f))
    shape = {"model": {**c["model"], **{k: s[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                          "num_attention_heads", "num_key_value_heads", "context")},
                       "tie_word_embeddings": True},
             "stage2": {"prefix_tokens": s["prefix_tokens"], "attn_smooth": s["attn_smooth"]}}
    for arm in SHIPPED_ARMS:
        P = ARM_P[arm]
        own = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith(arm + "/")} if P > 1 else None
        # greedy with repetition penalty 1.3, as the shipped model decodes (readable Python at every P)
        generation = {"bos_token_id": sp["<|endoftext|>"], "eos_token_id": [sp["<|im_end|>"], sp["<|endoftext|>"]],
                      "do_sample": False, "repetition_penalty": 1.3}
        write_variant(os.path.join(root, f"p{P}"), hf_config(shape, P, None, sp), generation, bb, own)
    log(f"exported {root}")
    return root


def finish(args):
    """After the device run: export the chosen size, keep the records, fit the law, draw the chart."""
    c = load_cfg()
    s = size_settings(c, args.size, args.recipe)
    tensors = read_shards(os.path.join(args.results, args.size))
    export(c, s, tensors, args.dest)
    record = args.record
    os.makedirs(record, exist_ok=True)
    for size in sorted(os.listdir(args.results)):
        src = os.path.join(args.results, size)
        if os.path.isfile(os.path.join(src, "results.json")):
            os.makedirs(os.path.join(record, size), exist_ok=True)
            for f in ("results.json", "train.log"):
                if os.path.exists(os.path.join(src, f)):
                    shutil.copy(os.path.join(src, f), os.path.join(record, size, f))
    import lawfit

    lawfit.main(["--results", record, "--out", record, "--chart", args.chart])


def cpu_test(args):
    """corpus archive (a small slice) -> prepare -> train tiny twice (two 'sizes') -> finish into a temp dest."""
    import tempfile

    c = load_cfg()
    tmp = tempfile.mkdtemp(prefix="parscale-dynamic-")
    corpus = args.corpus or os.path.join(ROOT, c["dynamic"]["corpus"]["archive"])
    log(f"cpu-test in {tmp}")
    prepare(argparse.Namespace(corpus=corpus, work=os.path.join(tmp, "work"), limit_mb=args.limit_mb or 1.0))
    # a second tiny size, so the law fit has two backbone sizes as on the device
    c["dynamic"]["sizes"]["tiny2"] = dict(c["dynamic"]["sizes"]["tiny"], hidden_size=96, intermediate_size=192)
    cfg_path = os.path.join(tmp, "config.json")
    json.dump(c, open(cfg_path, "w"))
    env = dict(os.environ, PARSCALE_TRAIN_CONFIG=cfg_path, PYTHONUNBUFFERED="1")
    out = os.path.join(tmp, "out")
    seconds = args.max_seconds or 40
    recipe = ["--recipe", args.recipe] if args.recipe else []
    procs = [subprocess.Popen([sys.executable, __file__, "train", "--work", os.path.join(tmp, "work"), "--size", size,
                               "--out", out, "--max-seconds", str(seconds), *recipe,
                               "--end-by", str(time.time() + seconds + 25)], env=env) for size in ("tiny", "tiny2")]
    assert all(p.wait() == 0 for p in procs), "a training process failed"
    subprocess.run([sys.executable, __file__, "finish", "--results", out, "--size", "tiny", *recipe, "--dest", os.path.join(tmp, "fixtures"),
                    "--chart", os.path.join(tmp, "law.svg"), "--record", os.path.join(tmp, "record")], env=env, check=True)
    log(f"cpu-test done: {tmp}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["prepare", "train", "eval", "finish", "cpu-test"])
    ap.add_argument("--corpus", default=None, help="prepare: the archive from corpus.py")
    ap.add_argument("--work", default=os.path.join(HERE, "work"))
    ap.add_argument("--limit-mb", type=float, default=None, help="prepare: only this many MB of training text")
    ap.add_argument("--size", default="small")
    ap.add_argument("--recipe", default=None, help="train/eval/finish/cpu-test: apply config.json dynamic.recipes[NAME] over the size's settings")
    ap.add_argument("--out", default=os.path.join(HERE, "work", "out"))
    ap.add_argument("--max-steps", type=int, default=None, help="train: at most this many steps (the schedule runs over them), within the epoch cap")
    ap.add_argument("--max-seconds", type=float, default=None, help="train: wall-clock budget of the training loop (cpu-test: default 40)")
    ap.add_argument("--end-by", type=float, default=None,
                    help="train: unix time by which training and eval must be done (the loop stops eval_reserve_seconds before)")
    ap.add_argument("--compile", action="store_true", help="train: torch.compile each arm's loss")
    ap.add_argument("--results", default=None, help="finish: the folder the device run wrote ($OUT)")
    ap.add_argument("--dest", default=os.path.join(ROOT, "fixtures"))
    ap.add_argument("--chart", default=os.path.join(ROOT, "docs", "default-model-law.svg"))
    ap.add_argument("--record", default=os.path.join(HERE, "run-dynamic"))
    a = ap.parse_args()
    if a.cmd == "prepare" and not a.corpus:
        a.corpus = os.path.join(ROOT, load_cfg()["dynamic"]["corpus"]["archive"])
    {"prepare": prepare, "train": train, "eval": eval_only, "finish": finish, "cpu-test": cpu_test}[a.cmd](a)


if __name__ == "__main__":
    main()
