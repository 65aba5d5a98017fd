"""Read tensors from checkpoint files, which may be damaged or crafted: each safetensors header is checked
before safetensors reads it, and anything wrong is one CheckpointError naming the file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open

# transformers' vision-language checkpoints (model_type in their config.json) whose vision tower, Q-Former,
# projection and language model the adapters and qformer.convert read: BLIP-2, InstructBLIP, InstructBLIP-Video.
CHECKPOINT_TYPES = ("blip-2", "instructblip", "instructblipvideo")
# A header is a few hundred bytes a tensor; 16 MiB describes some 100k tensors, more than any checkpoint
# has, and bounds what a crafted length field can make the reader allocate and parse.
MAX_HEADER_BYTES = 16 * 2**20
# Bytes per element of each safetensors dtype.
DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


class CheckpointError(ValueError):
    """A bridge directory, weights file or training checkpoint that is missing, damaged, crafted or does not
    fit what reads it. The message names the file and what is wrong with it."""


def safetensors_header(path: str | Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{name: (dtype, shape)} of a safetensors file, after checking what safetensors would trust: the
    8-byte little-endian header length (bounded, inside the file), the header (a JSON object), each dtype,
    shape and data range, and that the ranges tile the data exactly, so no tensor reaches past the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little")
            if len(head) < 8 or n > min(MAX_HEADER_BYTES, size - 8):
                raise CheckpointError(
                    f"{path}: not a safetensors file (its first 8 bytes give a {n}-byte header; the file has {size} "
                    f"bytes and a header may have at most {MAX_HEADER_BYTES})"
                )
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (its header is not a JSON object)")
    data_bytes = size - 8 - n
    out, ranges = {}, []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        ok = isinstance(entry, dict) and entry.get("dtype") in DTYPE_SIZES
        shape, offsets = (entry.get("shape"), entry.get("data_offsets")) if ok else (None, None)
        ok = ok and _ints(shape) and _ints(offsets) and len(offsets) == 2 and offsets[0] <= offsets[1]
        if not ok:
            raise CheckpointError(f"{path}: tensor {name!r} has no valid dtype, shape and data_offsets: {str(entry)[:200]}")
        nbytes = math.prod(shape) * DTYPE_SIZES[entry["dtype"]]
        if offsets[1] - offsets[0] != nbytes or offsets[1] > data_bytes:
            raise CheckpointError(
                f"{path}: tensor {name!r} ({entry['dtype']} {shape}, {nbytes} bytes) does not fit its data range "
                f"{offsets} in the file's {data_bytes} bytes of data"
            )
        out[name] = (entry["dtype"], tuple(shape))
        ranges.append(offsets)
    end = 0
    for begin, stop in sorted(ranges):
        if begin != end:
            raise CheckpointError(f"{path}: the tensors' data ranges overlap or leave a gap at byte {end}")
        end = stop
    if end != data_bytes:
        raise CheckpointError(f"{path}: the tensors take {end} bytes of data but the file holds {data_bytes} (truncated or padded)")
    return out


def _ints(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)


def load_prefixed(directory: str | Path, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors whose names start with `prefix`, with the prefix removed. Reads only those tensors."""
    d = Path(directory)
    index = d / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (d / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{d}: no model.safetensors or model.safetensors.index.json (only safetensors checkpoints are read)")
    out = {}
    for name in files:
        safetensors_header(d / name)
        with safe_open(str(d / name), framework="pt") as f:
            for key in f.keys():
                if key.startswith(prefix):
                    out[key[len(prefix) :]] = f.get_tensor(key)
    return out
