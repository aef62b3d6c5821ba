"""Build the issue-22 training corpus: the CPython 3.11.7 stdlib plus the .py files of a fixed
list of Debian bookworm packages, with two held-out sets. See training/README.md.

  python3 training/corpus.py build [--stdlib DIR] [--debs DIR] [--out FILE.tar.xz]

Writes one tar.xz (default: config dynamic.corpus.archive, an ignored folder the lead carries to
the GPU machine) with members
  manifest.json        packages and versions, counts, every filter's drops, the dev/held-out lists
  train/<src>/<path>   training files          (<src> = "stdlib" or the Debian package name)
  dev/<src>/<path>     1% of them, by file, for checkpoint choice only
  heldout/stdlib/...   the stdlib held-out modules of config corpus.heldout_modules
  heldout2/<pkg>/...   whole Debian packages no stage trains on (config heldout2_packages)
Only this script needs the network (apt-get download); tokenizing happens in dynamic.py prepare.
Needs no third-party Python module.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import subprocess
import sys
import tarfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def load_cfg():
    with open(os.environ.get("PARSCALE_TRAIN_CONFIG", os.path.join(HERE, "config.json"))) as f:
        return json.load(f)


def log(*a):
    print(*a, flush=True)


def default_stdlib():
    prefix = subprocess.run(["pyenv", "prefix", "3.11.7"], capture_output=True, text=True, check=True).stdout.strip()
    return os.path.join(prefix, "lib", "python3.11")


def fetch_package(pkg: str, debs: str) -> tuple[str, str]:
    """apt-get download PKG into DEBS (once) and unpack it with dpkg -x; returns (version, tree)."""
    os.makedirs(debs, exist_ok=True)
    have = [f for f in os.listdir(debs) if f.startswith(pkg + "_") and f.endswith(".deb")]
    if not have:
        subprocess.run(["apt-get", "download", pkg], cwd=debs, check=True, capture_output=True)
        have = [f for f in os.listdir(debs) if f.startswith(pkg + "_") and f.endswith(".deb")]
    deb = os.path.join(debs, sorted(have)[-1])
    version = subprocess.run(["dpkg-deb", "-f", deb, "Version"], capture_output=True, text=True, check=True).stdout.strip()
    tree = os.path.join(debs, "tree", pkg)
    if not os.path.isdir(tree):
        os.makedirs(tree)
        subprocess.run(["dpkg", "-x", deb, tree], check=True)
    return version, tree


def walk_py(root: str):
    """Every .py under root, sorted, as (path relative to root, absolute path)."""
    for d, ds, fs in os.walk(root):
        ds[:] = sorted(x for x in ds if x not in ("__pycache__", "site-packages"))
        for f in sorted(fs):
            if f.endswith(".py"):
                p = os.path.join(d, f)
                yield os.path.relpath(p, root).replace(os.sep, "/"), p


def read_text(path: str, max_bytes: int):
    """The file as text, or the reason it is skipped."""
    if os.path.islink(path):
        return None, "symlink"
    if os.path.getsize(path) > max_bytes:
        return None, "over max_file_bytes"
    try:
        with open(path, encoding="utf-8") as f:
            return f.read(), None
    except (UnicodeDecodeError, OSError):
        return None, "not utf-8"


def matches(rel: str, patterns) -> bool:
    return any(rel == h or (h.endswith("/") and rel.startswith(h)) for h in patterns)


class OverlapIndex:
    """Finds vendored copies of held-out files: a training file is dropped when many of its
    non-trivial lines (stripped, at least min_chars long) are lines of one held-out file,
    as a fraction of either file."""

    def __init__(self, min_chars: int, min_lines: int, max_frac: float):
        self.min_chars, self.min_lines, self.max_frac = min_chars, min_lines, max_frac
        self.files: list[tuple[str, set]] = []
        self.union: set = set()

    def lines(self, text: str) -> set:
        return {s for s in (ln.strip() for ln in text.splitlines()) if len(s) >= self.min_chars}

    def add(self, name: str, text: str):
        s = self.lines(text)
        self.files.append((name, s))
        self.union |= s

    def copy_of(self, text: str):
        mine = self.lines(text)
        if len(mine & self.union) < self.min_lines:
            return None
        for name, theirs in self.files:
            shared = len(mine & theirs)
            if shared >= self.min_lines and (shared / len(mine) >= self.max_frac or shared / len(theirs) >= self.max_frac):
                return name
        return None


def build(args):
    c = load_cfg()
    old = c["corpus"]  # the stdlib held-out modules and their tests, as for the shipped model
    dc = c["dynamic"]["corpus"]
    t0 = time.time()
    stdlib = args.stdlib or default_stdlib()
    max_bytes = dc["max_file_bytes"]
    skipped: dict[str, list] = {}

    def skip(reason, name):
        skipped.setdefault(reason, []).append(name)

    # 1. held-out sets first: every later filter compares against them
    heldout, heldout2 = [], []
    overlap = OverlapIndex(dc["overlap_min_line_chars"], dc["overlap_min_lines"], dc["overlap_max_frac"])
    stdlib_files = []
    for rel, p in walk_py(stdlib):
        text, why = read_text(p, max_bytes)
        if text is None:
            skip(why, f"stdlib/{rel}")
        elif matches(rel, old["heldout_modules"]):
            heldout.append((f"stdlib/{rel}", text))
            overlap.add(f"stdlib/{rel}", text)
        elif matches(rel, old["excluded_tests_of_heldout"]):
            skip("test of a held-out module", f"stdlib/{rel}")
        else:
            stdlib_files.append((f"stdlib/{rel}", text))
    packages = {}

    def package_files(pkg: str, role: str) -> tuple[str, list]:
        """A Debian package's readable .py files as (name, text); the unreadable ones noted as skipped."""
        version, tree = fetch_package(pkg, args.debs)
        packages[pkg] = {"version": version, "role": role}
        files = []
        for rel, p in walk_py(tree):
            text, why = read_text(p, max_bytes)
            if text is None:
                skip(why, f"{pkg}/{rel}")
            else:
                files.append((f"{pkg}/{rel}", text))
        return version, files

    for pkg in dc["heldout2_packages"]:
        for name, text in package_files(pkg, "heldout2")[1]:
            heldout2.append((name, text))
            overlap.add(name, text)
    # held-out names: a training file with one of these basenames (or under one of these
    # import folders) is dropped even when its text differs (another version of the module)
    held_basenames = {h for h in old["heldout_modules"] if not h.endswith("/")}
    held_dirs = [h for h in old["heldout_modules"] if h.endswith("/")] + dc["heldout2_import_dirs"]

    def held_name(name: str) -> bool:
        base = name.rsplit("/", 1)[-1]
        return base in held_basenames or any("/" + d in name for d in held_dirs)

    # 2. training candidates: stdlib, then the packages in config order (first copy wins)
    candidates = list(stdlib_files)
    for pkg in dc["train_packages"]:
        version, files = package_files(pkg, "train")
        candidates += files
        log(f"{pkg} {version}: {len(files)} files ({time.time() - t0:.0f}s)")
    seen = {hashlib.sha256(t.encode()).hexdigest() for _, t in heldout + heldout2}
    train = []
    for name, text in candidates:
        h = hashlib.sha256(text.encode()).hexdigest()
        if h in seen:
            skip("exact duplicate", name)
            continue
        seen.add(h)
        if any(part in name for part in dc["exclude_path_parts"]):
            skip("generated or data (exclude_path_parts)", name)
            continue
        if not name.startswith("stdlib/") and held_name(name):
            skip("held-out module name", name)
            continue
        src = overlap.copy_of(text)
        if src is not None:
            skip(f"shares lines with held-out {src}", name)
            continue
        train.append((name, text))
    # 3. dev split by file, seeded
    rng = random.Random(c["seed"] + 22)
    order = list(range(len(train)))
    rng.shuffle(order)
    n_dev = max(1, int(len(train) * dc["dev_frac"]))
    dev_idx = set(order[:n_dev])
    split = {"train": [f for i, f in enumerate(train) if i not in dev_idx],
             "dev": [f for i, f in enumerate(train) if i in dev_idx],
             "heldout": heldout, "heldout2": heldout2}
    nbytes = {k: sum(len(t.encode()) for _, t in v) for k, v in split.items()}
    per_src: dict[str, list] = {}
    for name, text in split["train"]:
        s = per_src.setdefault(name.split("/", 1)[0], [0, 0])
        s[0] += 1
        s[1] += len(text.encode())
    manifest = {
        "stdlib": {"python": "3.11.7", "path": stdlib},
        "debian_release": c["dynamic"]["corpus"]["debian_release"],
        "packages": packages,
        "files": {k: len(v) for k, v in split.items()},
        "bytes": nbytes,
        "train_by_source": {k: {"files": v[0], "bytes": v[1]} for k, v in sorted(per_src.items())},
        "skipped_counts": {k: len(v) for k, v in sorted(skipped.items())},
        "skipped_overlap_or_name": {k: v for k, v in sorted(skipped.items()) if k.startswith("shares") or k.startswith("held-out")},
        "dev_files": sorted(n for n, _ in split["dev"]),
        "heldout_files": [n for n, _ in heldout],
        "heldout2_files": [n for n, _ in heldout2],
    }
    log(json.dumps({k: manifest[k] for k in ("files", "bytes", "skipped_counts")}, indent=1))
    out = args.out or os.path.join(ROOT, dc["archive"])
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tar_path = out[: -len(".xz")] if out.endswith(".xz") else out + ".tar"
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tf:
        def add(name, data: bytes):
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime, ti.mode = len(data), 0, 0o644  # fixed metadata: same input, same bytes
            tf.addfile(ti, io.BytesIO(data))

        add("manifest.json", json.dumps(manifest, indent=1).encode())
        for part, files in split.items():
            for name, text in sorted(files):  # sorted by package/path: similar files adjacent compress better
                add(f"{part}/{name}", text.encode())
    log(f"tar {os.path.getsize(tar_path) / 1e6:.1f} MB; compressing with xz ({time.time() - t0:.0f}s)")
    subprocess.run(["xz", "-9", "-T0", "-f", tar_path], check=True)
    if tar_path + ".xz" != out:
        os.replace(tar_path + ".xz", out)
    log(f"wrote {out}: {os.path.getsize(out) / 1e6:.1f} MB ({time.time() - t0:.0f}s)")
    with open(os.path.join(os.path.dirname(out), "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["build"])
    ap.add_argument("--stdlib", default=None, help="CPython 3.11.7 Lib/ (default: pyenv prefix 3.11.7)")
    ap.add_argument("--debs", default=os.path.join(ROOT, ".tmp", "debs"), help="download cache (ignored)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    build(a)


if __name__ == "__main__":
    sys.exit(main())
