#!/usr/bin/env python3
"""Held-out NLL per file and per P through the shipped ONNX path, and how often the order holds.

Issue 22 asks for NLL(P1) > NLL(P2) > NLL(P4) > NLL(P8) "on any other held-out Python excerpt":
this scores every held-out file of the corpus archive (`heldout/` members: held-out set 1, the
CPython modules; `heldout2/`: set 2, python3-attr and python3-more-itertools) with `parscale eval --json`
at each P, writes one JSON line per file and P, and prints how many files keep the order.

  python3 training/per_file_eval.py [--model DIR] [--out F.jsonl]    # score, then summarize
  python3 training/per_file_eval.py --summary F.jsonl                 # summarize an earlier run
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def score(model: str | None, archive: str, out: str, parallel: list[int]) -> None:
    with tempfile.TemporaryDirectory(prefix="parscale-heldout-") as tmp, open(out + ".tmp", "w") as sink:
        with tarfile.open(archive) as tar:
            members = sorted((m for m in tar.getmembers() if m.isfile() and m.name.startswith(("heldout/", "heldout2/")) and m.name.endswith(".py")),
                             key=lambda m: m.name)
            tar.extractall(tmp, members=members)
        for m in members:
            for p in parallel:
                cmd = ["node", os.path.join(ROOT, "bin/run.js"), "eval", *([model] if model else []),
                       "-f", os.path.join(tmp, m.name), "-p", str(p), "--json"]
                run = subprocess.run(cmd, capture_output=True, text=True)
                if run.returncode != 0:
                    sys.exit(f"{m.name} at P = {p}: {run.stderr.strip() or run.stdout.strip()}")
                sink.write(json.dumps({"file": m.name, "parallel": p, "r": json.loads(run.stdout)}) + "\n")
                sink.flush()
            print(m.name, file=sys.stderr)
    os.replace(out + ".tmp", out)  # nothing half-written under the final name


def summarize(path: str) -> dict:
    by_file: dict[str, dict[int, tuple[float, int]]] = {}
    for line in open(path):
        row = json.loads(line)
        by_file.setdefault(row["file"], {})[row["parallel"]] = (row["r"]["mean_nll"], row["r"]["predicted"])
    ps = sorted({p for v in by_file.values() for p in v})
    summary: dict = {"files": len(by_file), "parallel": ps, "sets": {}}
    for name, prefix in (("set 1", "heldout/"), ("set 2", "heldout2/")):
        files = {f: v for f, v in by_file.items() if f.startswith(prefix)}
        if not files:
            continue
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
    args = ap.parse_args()
    path = args.summary
    if not path:
        if not os.path.isfile(args.corpus):
            sys.exit(f"{args.corpus}: no corpus archive (python3 training/corpus.py build makes it)")
        score(args.model, args.corpus, args.out, [int(p) for p in args.parallel.split(",")])
        path = args.out
    print(json.dumps(summarize(path), indent=1))


if __name__ == "__main__":
    main()
