"""Read tensors from a Hugging Face checkpoint directory (one or sharded safetensors files)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open


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
        with safe_open(str(d / name), framework="pt") as f:
            for key in f.keys():
                if key.startswith(prefix):
                    out[key[len(prefix):]] = f.get_tensor(key)
    return out
