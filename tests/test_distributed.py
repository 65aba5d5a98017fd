"""train.py beyond DDP: FSDP through `accelerate launch` with the shipped config, on two CPU processes; the
shipped DeepSpeed config parses (Accelerate runs DeepSpeed on CUDA GPUs only)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import free_port, tiny_config
from PIL import Image

from qformer import Bridge
from qformer.build import new_bridge

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "demos" / "accelerate"


@pytest.mark.slow
def test_fsdp_on_two_cpu_processes_shards_trains_and_saves_a_bridge(tiny_dirs, tmp_path):
    rows = []
    for i, color in enumerate([(220, 30, 30), (30, 200, 40), (30, 40, 220), (230, 220, 30)]):
        a = np.full((32, 32, 3), 128, np.uint8)
        a[8:24, 8:24] = color
        Image.fromarray(a).save(tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", "caption": f"a {['red', 'green', 'blue', 'yellow'][i]} square"})
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    torch.manual_seed(0)
    start = new_bridge(tiny_config(tiny_dirs, num_frames=1), qformer_init=None)
    start.save_pretrained(tmp_path / "start")
    out = tmp_path / "fsdp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "fsdp.yaml")]
    cmd += ["--main_process_port", str(free_port()), str(ROOT / "train.py"), "--stage", "2", "--init-from", str(tmp_path / "start")]
    cmd += ["--data", str(tmp_path / "train.jsonl"), "--output", str(out), "--max-steps", "2", "--batch-size", "2"]
    cmd += ["--lr", "1e-2", "--num-workers", "0", "--log-with", "none"]
    # On CPUs alone the processes form a gloo group; train.py then runs the config's FSDP, not DDP.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), ACCELERATE_USE_CPU="true")
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 processes (FSDP)" in run.stdout
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    # The bridge was written whole (gathered from the shards) and learnt; the checkpoint is a bridge too.
    trained = Bridge.from_pretrained(out)
    assert not torch.equal(trained.projection.weight, start.projection.weight)
    for k, v in Bridge.from_pretrained(out / "checkpoints" / "step-00000002").trainable_state_dict().items():
        assert torch.equal(v, trained.trainable_state_dict()[k]), k


def test_shipped_accelerate_configs_parse():
    from accelerate.commands.config.config_args import load_config_from_file

    fsdp = load_config_from_file(str(CONFIGS / "fsdp.yaml"))
    assert fsdp.distributed_type == "FSDP" and fsdp.fsdp_config["fsdp_version"] == 2
    assert fsdp.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    deepspeed = load_config_from_file(str(CONFIGS / "deepspeed.yaml"))
    assert deepspeed.distributed_type == "DEEPSPEED" and deepspeed.deepspeed_config["zero_stage"] == 3
