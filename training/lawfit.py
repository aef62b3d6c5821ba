"""Fit the ParScale law L = (A / (N (k ln P + 1)))^alpha + E to our runs (numpy only).

  python3 training/lawfit.py --results training/run-dynamic [--out DIR] [--chart FILE.svg]

Reads <results>/<size>/results.json (dynamic.py train), takes the held-out NLL of arms
p1, p2, p4, p8 of every size, and fits per held-out set. N is the backbone's non-embedding
parameter count (embeddings are tied; the per-P prefixes and aggregation are not counted,
as in the paper, where N is the backbone's size and P multiplies it).
How: for fixed (alpha, k) the law is linear in c = A^alpha and E, so a grid over (alpha, k)
with least squares for (c, E) at each point, then a finer grid around the best.
Writes <out>/fit.json and <out>/law-chart.vl.json; with --chart renders the SVG through
training/chart.mjs (vega-lite, the repo's chart path).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
PS = [1, 2, 4, 8]
PAPER_K = 0.39


def law(N, P, A, alpha, k, E):
    return (A / (N * (k * np.log(P) + 1))) ** alpha + E


def fit(N: np.ndarray, P: np.ndarray, L: np.ndarray) -> dict:
    """Least squares over (alpha, k) grids, (c = A^alpha, E >= 0) solved exactly at each point."""
    lnN, lnP = np.log(N), np.log(P)

    def search(alphas, ks):
        a = alphas[:, None, None]
        kk = ks[None, :, None]
        x = np.exp(-a * (lnN[None, None, :] + np.log(kk * lnP[None, None, :] + 1)))  # (alpha, k, points)
        xm, lm = x.mean(-1, keepdims=True), L.mean()
        c = ((x - xm) * (L - lm)).sum(-1) / np.maximum(((x - xm) ** 2).sum(-1), 1e-300)
        E = lm - c * xm[..., 0]
        bad = (c <= 0) | (E < 0)
        # where the free E would be negative, refit with E = 0
        c0 = (x * L).sum(-1) / np.maximum((x * x).sum(-1), 1e-300)
        c = np.where(E < 0, c0, c)
        E = np.where(E < 0, 0.0, E)
        sse = ((c[..., None] * x + E[..., None] - L) ** 2).sum(-1)
        sse = np.where(c <= 0, np.inf, sse)
        i, j = np.unravel_index(np.argmin(sse), sse.shape)
        return alphas[i], ks[j], c[i, j], E[i, j], sse[i, j], bool(bad.all())

    K_MAX = 5.0
    alpha, k, c, E, sse, _ = search(np.geomspace(0.01, 3.0, 400), np.linspace(0.0, K_MAX, 501))
    if not np.isfinite(sse):  # loss does not fall with N (or with P): the law's form cannot fit
        return {"ok": False, "why": "no (alpha, k) with A > 0 and E >= 0 fits: loss does not fall with N·(k ln P + 1)"}
    alpha, k, c, E, sse, _ = search(np.linspace(alpha * 0.9, alpha * 1.1, 201), np.linspace(max(0, k - 0.02), k + 0.02, 201))
    A = c ** (1 / alpha)
    notes = []
    if k >= K_MAX - 0.05:
        notes.append(f"k at the grid's upper end ({K_MAX}): not identified by these points")
    if k <= 0.0:
        notes.append("k = 0: P adds nothing in this fit")
    if E == 0.0:
        notes.append("E pinned at 0")
    pred = law(N, P, A, alpha, k, E)
    return {"ok": True, "notes": notes, "k": float(k), "alpha": float(alpha), "A": float(A), "E": float(E),
            "rmse": float(np.sqrt(sse / len(L))), "max_abs_residual": float(np.abs(pred - L).max()),
            "points": [{"N": int(n), "P": int(p), "nll": float(l), "fit": float(f)} for n, p, l, f in zip(N, P, L, pred)],
            "p_worth_params": {str(p): float(k * np.log(p) + 1) for p in PS}}


def chart_spec(rows, controls, fits, set_name, shown=()):
    """Loss vs P for the fitted runs (and `shown`: other runs drawn, not fitted); the law's panel
    only when the fit holds."""
    f = fits[set_name]
    y = {"field": "nll", "type": "quantitative", "title": f"held-out NLL ({set_name})", "scale": {"zero": False}}
    x = {"field": "P", "type": "quantitative", "scale": {"type": "log", "base": 2}, "axis": {"values": PS}}
    observed = [
        {"data": {"values": list(rows) + list(shown)}, "mark": {"type": "line", "point": True},
         "encoding": {"x": x, "y": y, "color": {"field": "size", "type": "nominal", "title": "run"}}},
        {"data": {"values": controls}, "mark": {"type": "point", "shape": "cross", "size": 90, "filled": True},
         "encoding": {"x": x, "y": {"field": "nll", "type": "quantitative"}, "color": {"field": "size", "type": "nominal"}}},
    ]
    if not f["ok"]:
        return {"$schema": "https://vega.github.io/schema/vega-lite/v5.json",
                "title": "Held-out loss against P (crosses: P=1 + prefix control); no law fit, see fit.json",
                "width": 420, "height": 300, "layer": observed}
    curve = []
    for size, N in sorted({(r["size"], r["N"]) for r in rows}, key=lambda t: t[1]):
        for p in np.geomspace(1, 8, 25):
            curve.append({"size": size, "P": float(p), "fit": float(law(N, p, f["A"], f["alpha"], f["k"], f["E"]))})
    n_min = min(r["N"] for r in rows) * 0.7
    n_max = max(r["N"] for r in rows) * 8 * 1.2
    law_line = [{"Neff": float(n), "fit": float((f["A"] / n) ** f["alpha"] + f["E"])} for n in np.geomspace(n_min, n_max, 40)]
    pts = [dict(r, Neff=r["N"] * (f["k"] * np.log(r["P"]) + 1)) for r in rows]
    y = {"field": "nll", "type": "quantitative", "title": f"held-out NLL ({set_name})", "scale": {"zero": False}}
    return {
        "$schema": "https://vega.github.io/schema/vega-lite/v5.json",
        "title": f"Held-out loss against P and against parameters; fit k = {f['k']:.2f} (paper 0.39)",
        "hconcat": [
            {"width": 300, "height": 260, "title": "loss vs P (dashed: fitted law; x: P=1 + prefix control)",
             "layer": [
                 {"data": {"values": rows}, "mark": {"type": "line", "point": True},
                  "encoding": {"x": {"field": "P", "type": "quantitative", "scale": {"type": "log", "base": 2},
                                     "axis": {"values": PS}},
                               "y": y, "color": {"field": "size", "type": "nominal"}}},
                 {"data": {"values": curve}, "mark": {"type": "line", "strokeDash": [4, 3], "opacity": 0.7},
                  "encoding": {"x": {"field": "P", "type": "quantitative", "scale": {"type": "log", "base": 2}},
                               "y": {"field": "fit", "type": "quantitative"}, "color": {"field": "size", "type": "nominal"}}},
                 {"data": {"values": controls}, "mark": {"type": "point", "shape": "cross", "size": 90, "filled": True},
                  "encoding": {"x": {"field": "P", "type": "quantitative", "scale": {"type": "log", "base": 2}},
                               "y": {"field": "nll", "type": "quantitative"}, "color": {"field": "size", "type": "nominal"}}},
             ]},
            {"width": 300, "height": 260, "title": "loss vs N·(k·ln P + 1): what P is worth in parameters",
             "layer": [
                 {"data": {"values": law_line}, "mark": {"type": "line", "strokeDash": [4, 3], "color": "gray"},
                  "encoding": {"x": {"field": "Neff", "type": "quantitative", "scale": {"type": "log"},
                                     "title": "effective non-embedding parameters"},
                               "y": {"field": "fit", "type": "quantitative", "scale": {"zero": False}}}},
                 {"data": {"values": pts}, "mark": {"type": "point", "filled": True, "size": 60},
                  "encoding": {"x": {"field": "Neff", "type": "quantitative", "scale": {"type": "log"}},
                               "y": y, "color": {"field": "P", "type": "ordinal"},
                               "shape": {"field": "size", "type": "nominal"}}},
             ]},
        ],
    }


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", required=True)
    ap.add_argument("--out", default=None)
    ap.add_argument("--chart", default=None, help="SVG to write (needs node and the repo's node_modules)")
    ap.add_argument("--label", default=None, help="chart: a prefix for the fitted runs' names")
    ap.add_argument("--also", action="append", default=[], metavar="LABEL=DIR",
                    help="other runs (DIR/<size>/results.json) drawn in the chart, not fitted")
    a = ap.parse_args(argv)
    out = a.out or a.results
    runs = []
    for size in sorted(os.listdir(a.results)):
        f = os.path.join(a.results, size, "results.json")
        if os.path.isfile(f):
            runs.append(json.load(open(f)))
    if len(runs) < 2:
        print(f"lawfit: need results of at least two sizes under {a.results}, found {len(runs)}", file=sys.stderr)
        return 1
    fits, tables = {}, {}
    for set_name in ("heldout", "heldout2"):
        rows, controls = [], []
        for r in runs:
            for p in PS:
                rows.append({"size": r["size"], "N": r["non_embedding_params"], "P": p, "nll": r["eval"][f"p{p}"][set_name]["nll"]})
            if "control" in r["eval"]:
                controls.append({"size": r["size"], "P": 1, "nll": r["eval"]["control"][set_name]["nll"]})
        N = np.array([x["N"] for x in rows], float)
        P = np.array([x["P"] for x in rows], float)
        L = np.array([x["nll"] for x in rows], float)
        fits[set_name] = fit(N, P, L)
        tables[set_name] = {"rows": rows, "controls": controls}
        fr = fits[set_name]
        if not fr["ok"]:
            print(f"{set_name}: {fr['why']}")
            continue
        print(f"{set_name}: k = {fr['k']:.3f} (paper {PAPER_K}), alpha = {fr['alpha']:.3f}, A = {fr['A']:.4g}, "
              f"E = {fr['E']:.3f}, rmse {fr['rmse']:.4f}; P=8 is worth {fr['p_worth_params']['8']:.2f}x parameters"
              + "".join(f"; {n}" for n in fr["notes"]))
    json.dump({"N": "backbone non-embedding parameters", "paper_k": PAPER_K, "fits": fits, "tables": tables},
              open(os.path.join(out, "fit.json"), "w"), indent=1)
    shown, controls = [], list(tables["heldout"]["controls"])
    for item in a.also:
        label, folder = item.split("=", 1)
        for size in sorted(os.listdir(folder)):
            f = os.path.join(folder, size, "results.json")
            if os.path.isfile(f) and "eval" in (r := json.load(open(f))):
                name = f"{label} {size}"
                shown += [{"size": name, "P": p, "nll": r["eval"][f"p{p}"]["heldout"]["nll"]} for p in PS]
                if "control" in r["eval"]:
                    controls.append({"size": name, "P": 1, "nll": r["eval"]["control"]["heldout"]["nll"]})
    if a.label:
        for row in tables["heldout"]["rows"] + controls[: len(tables["heldout"]["controls"])]:
            row["size"] = f"{a.label} {row['size']}"
    spec = chart_spec(tables["heldout"]["rows"], controls, fits, "heldout", shown)
    spec_path = os.path.join(out, "law-chart.vl.json")
    json.dump(spec, open(spec_path, "w"), indent=1)
    if a.chart:
        subprocess.run(["node", os.path.join(HERE, "chart.mjs"), spec_path, a.chart], check=True)
        print(f"chart: {a.chart}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
