"""--load-in-4bit / --load-in-8bit: train.py, `qformer recaption` and `qformer chat` load the frozen LLM
quantised (bitsandbytes), and no bridge config records it."""

from __future__ import annotations

import argparse
import importlib.util
import io
import json

import numpy as np
import pytest
import torch
import transformers
from conftest import tiny_config
from PIL import Image

import train
from qformer import Bridge, chat, cli
from qformer.build import llm_loading, new_bridge


@pytest.fixture
def llm_loads(monkeypatch):
    """Each quantization_config the LLM loader passes to transformers; the model then loads unquantised,
    as the CPU cannot run bitsandbytes."""
    seen = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def recording(path, **kwargs):
        seen.append(kwargs.pop("quantization_config", None))
        return real(path, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", recording)
    return seen


def test_quantization_flags_reach_the_llm_loader_and_stay_out_of_the_bridge(tiny_dirs, tmp_path, llm_loads, monkeypatch):
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(tmp_path / "grey.png")
    (tmp_path / "train.jsonl").write_text(json.dumps({"image": "grey.png", "caption": "a gray square"}) + "\n")
    torch.manual_seed(0)
    new_bridge(tiny_config(tiny_dirs, num_frames=1), qformer_init=None).save_pretrained(tmp_path / "start")
    llm_loads.clear()
    args = ["--stage", "2", "--init-from", str(tmp_path / "start"), "--data", str(tmp_path / "train.jsonl"), "--output"]
    train.main([*args, str(tmp_path / "b"), "--max-steps", "1", "--num-workers", "0", "--log-with", "none", "--load-in-4bit"])
    assert [(q.load_in_4bit, q.load_in_8bit) for q in llm_loads] == [(True, False)]
    config = (tmp_path / "b" / "bridge_config.json").read_text()
    assert "bit" not in config and "quantiz" not in config

    out = tmp_path / "captions.jsonl"
    assert (
        cli.main(
            [
                "recaption",
                str(tmp_path / "grey.png"),
                "--out",
                str(out),
                "--bridge",
                str(tmp_path / "b"),
                "--workers",
                "0",
                "--load-in-8bit",
            ]
        )
        == 0
    )
    assert [(q.load_in_4bit, q.load_in_8bit) for q in llm_loads[1:]] == [(False, True)]

    parser = argparse.ArgumentParser()
    chat.add_arguments(parser)
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # the conversation ends at once
    chat.main(parser.parse_args(["--bridge", str(tmp_path / "b"), "--image", str(tmp_path / "grey.png"), "--load-in-4bit"]))
    assert [(q.load_in_4bit, q.load_in_8bit) for q in llm_loads[2:]] == [(True, False)]
    Bridge.from_pretrained(tmp_path / "b")  # and without the flags, no quantization
    assert llm_loads[3:] == [None] and llm_loading() == {}
    with pytest.raises(SystemExit):
        train.parse_args([*args, str(tmp_path / "c"), "--load-in-4bit", "--load-in-8bit"])


@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None,
    reason="4-bit loading needs a CUDA GPU and bitsandbytes (pip install bitsandbytes)",
)
def test_a_bridge_loads_its_llm_in_4_bits_on_a_gpu(tiny_dirs, tmp_path):
    import bitsandbytes as bnb

    torch.manual_seed(0)
    new_bridge(tiny_config(tiny_dirs, num_frames=1), qformer_init=None).save_pretrained(tmp_path / "b")
    bridge = Bridge.from_pretrained(tmp_path / "b", llm_kwargs=llm_loading(load_in_4bit=True))
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in bridge.llm.modules())
    assert bridge.config == Bridge.from_pretrained(tmp_path / "b").config
