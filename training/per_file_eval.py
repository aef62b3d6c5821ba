#!/usr/bin/env python3
"""Held-out NLL per file and per P through the shipped ONNX path, and how often the order holds.

Issue 22 asks for NLL(P1) > NLL(P2) > NLL(P4) > NLL(P8) "on any other held-out Python excerpt":
this scores every held-out file of the corpus archive (`heldout/` members: held-out set 1, the
CPython modules; `heldout2/`: set 2, python3-attr and python3-more-itertools) with `parscale eval --json`
at each P, writes one JSON line per file and P, and prints how many files keep the order.

  python3 training/per_file_eval.py [--model DIR] [--out F.jsonl]    # score, then summarize
  python3 training/per_file_eval.py --summary F.jsonl                 # summarize an earlier run
  python3 training/per_file_eval.py --text A.py B.py --out F.jsonl    # the same for any text files

Each token's NLL goes to F.tokens.jsonl beside F (`parscale eval --per-token`), and the summary then
also says, per file and step (P1→P2, P2→P4, P4→P8), whether the step is resolved at all: the paired
per-token differences, a moving-block bootstrap of their mean (blocks of 32 tokens, as neighbouring
tokens' losses are correlated), and the 95 % interval. A step whose interval straddles zero is not
evidence either way; the pooled figures say how many tokens an excerpt needs before a step of the
size this model has can be told from noise, and how many files are expected to keep the order by
chance alone.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tarfile
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


BLOCK = 32          # bootstrap block length in tokens
RESAMPLES = 4000
Z95 = 1.959964


SETS = (("set 1", "heldout/"), ("set 2", "heldout2/"))
SET_PREFIXES = tuple(prefix for _, prefix in SETS)


def grouped(names) -> list[tuple[str, list[str]]]:
    """The files of each held-out set (by archive path), then any other texts as one group."""
    groups = [(name, [f for f in names if f.startswith(prefix)]) for name, prefix in SETS]
    groups.append(("other texts", [f for f in names if not f.startswith(SET_PREFIXES)]))
    return [(name, files) for name, files in groups if files]


def tokens_path(out: str) -> str:
    return (out[:-len(".jsonl")] if out.endswith(".jsonl") else out) + ".tokens.jsonl"


def score(model: str | None, archive: str | None, texts: list[str], out: str, parallel: list[int]) -> None:
    partial = [out + ".tmp", tokens_path(out) + ".tmp"]
    try:
        score_into(model, archive, texts, partial, parallel)
    except BaseException:  # a failed eval exits: leave no partial records behind
        for path in partial:
            if os.path.exists(path):
                os.remove(path)
        raise
    os.replace(partial[1], tokens_path(out))
    os.replace(partial[0], out)  # nothing half-written under the final names


def score_into(model: str | None, archive: str | None, texts: list[str], partial: list[str], parallel: list[int]) -> None:
    with tempfile.TemporaryDirectory(prefix="parscale-heldout-") as tmp, open(partial[0], "w") as sink, open(partial[1], "w") as token_sink:
        files = [(t, t) for t in texts]  # (name in the records, path)
        if archive:
            with tarfile.open(archive) as tar:
                members = sorted((m for m in tar.getmembers() if m.isfile() and m.name.startswith(SET_PREFIXES) and m.name.endswith(".py")),
                                 key=lambda m: m.name)
                tar.extractall(tmp, members=members)
            files = [(m.name, os.path.join(tmp, m.name)) for m in members]
        for name, path in files:
            # every P in one process: the family package is loaded once and scores the same tokens at each P
            cmd = ["node", os.path.join(ROOT, "bin/run.js"), "eval", *([model] if model else []),
                   "-f", path, "-p", ",".join(map(str, parallel)), "--json", "--per-token"]
            run = subprocess.run(cmd, capture_output=True, text=True)
            if run.returncode != 0:
                sys.exit(f"{name}: {run.stderr.strip() or run.stdout.strip()}")
            out_json = json.loads(run.stdout)
            for result in out_json["results"] if len(parallel) > 1 else [out_json]:
                result.setdefault("model", out_json.get("model"))
                token_nll = result.pop("token_nll")
                sink.write(json.dumps({"file": name, "parallel": result["parallel"], "r": result}) + "\n")
                token_sink.write(json.dumps({"file": name, "parallel": result["parallel"], "token_nll": [round(v, 6) for v in token_nll]}) + "\n")
            sink.flush()
            print(name, file=sys.stderr)


def block_bootstrap_se(d, rng) -> float:
    """Standard error of mean(d) by a moving-block bootstrap (BLOCK-token blocks, fewer on short files)."""
    import numpy as np
    n = len(d)
    block = max(1, min(BLOCK, n // 4))
    starts = np.arange(n - block + 1)
    count = math.ceil(n / block)
    picks = rng.choice(starts, size=(RESAMPLES, count))
    idx = (picks[:, :, None] + np.arange(block)[None, None, :]).reshape(RESAMPLES, -1)[:, :n]
    return float(d[idx].mean(axis=1).std(ddof=1))


def step_statistics(tokens_file: str, ps: list[int]) -> dict:
    """Per file and step: mean paired gain (NLL at the smaller P minus the larger), its bootstrap
    interval and verdict; pooled per step and set: the gain, the per-token spread that sets the noise,
    the tokens an excerpt needs for the gain to clear 1.96 standard errors, and the expected count of
    files in strict order if every file's true steps were the pooled ones."""
    import numpy as np
    rng = np.random.default_rng(20250515)
    nll: dict[str, dict[int, "np.ndarray"]] = {}
    for line in open(tokens_file):
        row = json.loads(line)
        nll.setdefault(row["file"], {})[row["parallel"]] = np.asarray(row["token_nll"], dtype=np.float64)
    steps = list(zip(ps, ps[1:]))
    files = {}
    for f, by_p in sorted(nll.items()):
        entry = {"tokens": int(len(by_p[ps[0]])), "steps": {}}
        for a, b in steps:
            d = by_p[a] - by_p[b]
            se = block_bootstrap_se(d, rng)
            lo, hi = float(d.mean()) - Z95 * se, float(d.mean()) + Z95 * se
            verdict = "in order" if lo > 0 else "reversed" if hi < 0 else "within noise"
            entry["steps"][f"{a}->{b}"] = {"gain": round(float(d.mean()), 5), "se": round(se, 5), "ci95": [round(lo, 5), round(hi, 5)], "verdict": verdict}
        files[f] = entry
    sets = {}
    for name, names in grouped(list(files)):
        pooled = {}
        expected = np.ones(len(names))
        for a, b in steps:
            key = f"{a}->{b}"
            d = np.concatenate([nll[f][a] - nll[f][b] for f in names])
            gain = float(d.mean())
            spread = block_bootstrap_se(d, rng) * math.sqrt(len(d))  # per-token spread, correlation included
            needed = (Z95 * spread / gain) ** 2 if gain > 0 else math.inf
            # P(observed step in order) for a file whose true step is the pooled gain
            se_files = np.array([files[f]["steps"][key]["se"] for f in names])
            expected *= np.array([0.5 * math.erfc(-gain / (s * math.sqrt(2))) if s > 0 else float(gain > 0) for s in se_files])
            verdicts = [files[f]["steps"][key]["verdict"] for f in names]
            pooled[key] = {"gain": round(gain, 5), "per_token_spread": round(spread, 4), "tokens_to_resolve": round(needed) if math.isfinite(needed) else None,
                           **{v: verdicts.count(v) for v in ("in order", "reversed", "within noise")}}
        sets[name] = {"files": len(names), "steps": pooled, "expected_strict_order_by_noise": round(float(expected.sum()), 1)}
    return {"block_tokens": BLOCK, "resamples": RESAMPLES, "sets": sets, "files": files}


def summarize(path: str) -> dict:
    by_file: dict[str, dict[int, tuple[float, int]]] = {}
    for line in open(path):
        row = json.loads(line)
        by_file.setdefault(row["file"], {})[row["parallel"]] = (row["r"]["mean_nll"], row["r"]["predicted"])
    ps = sorted({p for v in by_file.values() for p in v})
    summary: dict = {"files": len(by_file), "parallel": ps, "sets": {}}
    for name, names in grouped(list(by_file)):
        files = {f: by_file[f] for f in names}
        ordered = [f for f, v in files.items() if all(v[a][0] > v[b][0] for a, b in zip(ps, ps[1:]))]
        weighted = {p: sum(v[p][0] * v[p][1] for v in files.values()) / sum(v[p][1] for v in files.values()) for p in ps}
        summary["sets"][name] = {
            "files": len(files),
            "strict_order": len(ordered),
            "largest_p_lowest": sum(1 for v in files.values() if min(ps, key=lambda p: v[p][0]) == ps[-1]),
            "largest_p_below_p1": sum(1 for v in files.values() if v[ps[-1]][0] < v[ps[0]][0]),
            "token_weighted_nll": {str(p): round(x, 4) for p, x in weighted.items()},
            "broken": sorted(set(files) - set(ordered)),
        }
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model package or checkpoint folder (default: the embedded model)")
    ap.add_argument("--corpus", default=os.path.join(ROOT, ".carry/corpus/corpus.tar.xz"), help="the archive from corpus.py")
    ap.add_argument("--out", default="per-file-eval.jsonl")
    ap.add_argument("--parallel", default="1,2,4,8")
    ap.add_argument("--summary", default=None, help="only summarize this JSONL file")
    ap.add_argument("--text", nargs="+", default=None, help="score these text files instead of the archive's held-out files")
    ap.add_argument("--stats-out", default=None, help="write the per-file step statistics (JSON) here")
    args = ap.parse_args()
    path = args.summary
    if not path:
        for text in args.text or []:
            if not os.path.isfile(text):
                sys.exit(f"{text}: no such file")
        if not args.text and not os.path.isfile(args.corpus):
            sys.exit(f"{args.corpus}: no corpus archive (python3 training/corpus.py build makes it)")
        score(args.model, None if args.text else args.corpus, args.text or [], args.out, [int(p) for p in args.parallel.split(",")])
        path = args.out
    summary = summarize(path)
    if os.path.isfile(tokens_path(path)):
        stats = step_statistics(tokens_path(path), summary["parallel"])
        summary["steps_resolved"] = stats["sets"]
        within_noise = {}
        for name, body in summary["sets"].items():
            # a broken file whose reversed steps are all within noise is no evidence of a reversal
            within_noise[name] = sum(1 for f in body["broken"]
                                     if all(st["verdict"] != "reversed" for st in stats["files"][f]["steps"].values()))
        summary["broken_within_noise"] = within_noise
        if args.stats_out:
            with open(args.stats_out + ".tmp", "w") as sink:
                json.dump(stats, sink, indent=1)
            os.replace(args.stats_out + ".tmp", args.stats_out)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
