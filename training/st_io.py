"""Minimal safetensors reader/writer on numpy (no safetensors/torch needed).

Format: 8-byte little-endian header length N, N bytes of JSON header (padded with
spaces to a multiple of 8), then the data; every tensor's data_offsets are relative to
the data start, contiguous from 0, in header order, with no gaps.
"""
from __future__ import annotations

import json
import os
import struct

import numpy as np

_NP = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32}


def f32_to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> bfloat16, returned as uint16 bit patterns."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return u.astype(np.uint16)


def bf16_bits_to_f32(b: np.ndarray) -> np.ndarray:
    return (b.astype(np.uint32) << 16).view(np.float32)


def read_header(path: str):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    return n, header


def read(path: str, as_f32: bool = True, check: bool = True) -> dict:
    """Read every tensor; BF16/F16 are upcast to float32 when as_f32."""
    with open(path, "rb") as f:
        raw = f.read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    data = memoryview(raw)[8 + n :]
    out = {}
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        spans.append((a, b, name))
        buf = data[a:b]
        dt = info["dtype"]
        shape = info["shape"]
        if dt == "BF16":
            arr = np.frombuffer(buf, dtype=np.uint16).reshape(shape)
            arr = bf16_bits_to_f32(arr) if as_f32 else arr
        else:
            arr = np.frombuffer(buf, dtype=_NP[dt]).reshape(shape)
            if as_f32:
                arr = arr.astype(np.float32)
        out[name] = arr
    if check:
        spans.sort()
        pos = 0
        for a, b, name in spans:
            assert a == pos, f"{path}: gap/overlap before {name}"
            pos = b
        assert pos == len(data), f"{path}: trailing bytes"
    return out


def write(path: str, tensors: dict, dtype: str = "BF16", metadata: dict | None = None):
    """tensors: name -> float32 numpy array (stored as `dtype`). Names are sorted."""
    header = {"__metadata__": metadata or {"format": "pt"}}
    blobs = []
    pos = 0
    for name in sorted(tensors):
        a = np.asarray(tensors[name], dtype=np.float32)
        if dtype == "BF16":
            b = f32_to_bf16_bits(a).tobytes()
        elif dtype == "F16":
            b = a.astype(np.float16).tobytes()
        else:
            b = np.ascontiguousarray(a).tobytes()
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [pos, pos + len(b)]}
        blobs.append(b)
        pos += len(b)
    hj = json.dumps(header, separators=(",", ":")).encode()
    hj += b" " * ((-len(hj)) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hj)))
        f.write(hj)
        for b in blobs:
            f.write(b)
    os.replace(tmp, path)


def load_hf_folder(folder: str) -> tuple[dict, dict]:
    """(config, tensors as float32) for a Hugging Face model folder (single file or index)."""
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    idx = os.path.join(folder, "model.safetensors.index.json")
    tensors = {}
    if os.path.exists(idx):
        with open(idx) as f:
            wm = json.load(f)["weight_map"]
        for shard in sorted(set(wm.values())):
            part = read(os.path.join(folder, shard))
            for k in part:
                assert wm.get(k) == shard, f"{k} in {shard} but index says {wm.get(k)}"
            tensors.update(part)
        missing = set(wm) - set(tensors)
        assert not missing, f"index names missing tensors: {sorted(missing)[:5]}"
    else:
        tensors = read(os.path.join(folder, "model.safetensors"))
    return cfg, tensors
