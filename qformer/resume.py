"""A training checkpoint, checked whole before a run resumes from it.

train.py's checkpoint directory holds a bridge (bridge_config.json and bridge.safetensors, the trainable
weights), what Accelerate's save_state writes beside it for one optimizer and one scheduler
(optimizer.bin, scheduler.bin, and random_states_<i>.pkl for each process i) and progress.json.
Accelerate reads its files only once the models are loaded, and skips an unreadable RNG file silently,
so that the resumed run would quietly differ from the interrupted one: check_checkpoint reads them all
first, and check_rng_restored makes sure the RNG states did come back.
"""

from __future__ import annotations

import codecs
import json
import random
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from adapters.checkpoint import CheckpointError

from .bridge import CONFIG_NAME, WEIGHTS_NAME, read_bridge_dir

STATE_FILES = ("optimizer.bin", "scheduler.bin")
PROGRESS_NAME = "progress.json"
RNG_NAME = "random_states_{}.pkl"
RNG_KEYS = ("random_state", "numpy_random_seed", "torch_manual_seed")
# All an RNG state file may unpickle besides tensors and plain containers: NumPy's Mersenne Twister
# state, a uint32 array, and the codecs.encode that pickles its bytes.
_np_core = np._core if hasattr(np, "_core") else np.core
NUMPY_RNG_GLOBALS = [_np_core.multiarray._reconstruct, np.ndarray, np.dtype, codecs.encode]
if hasattr(np, "dtypes"):
    NUMPY_RNG_GLOBALS.append(np.dtypes.UInt32DType)


def check_checkpoint(directory: str | Path, progress_type: type):
    """The checkpoint's progress (a `progress_type` dataclass, read from progress.json) once every file
    of the checkpoint is there and reads: the bridge's config and weights (read_bridge_dir), the
    optimizer and scheduler states (unpickled with weights_only: tensors and plain containers only), each
    process's RNG states. A CheckpointError naming the first file that is missing or wrong otherwise."""
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"{d}: no such checkpoint directory")
    for name in (CONFIG_NAME, WEIGHTS_NAME, *STATE_FILES, RNG_NAME.format(0), PROGRESS_NAME):
        if not (d / name).is_file():
            raise CheckpointError(f"{d / name}: missing, so {d} is not a complete checkpoint")
    read_bridge_dir(d)
    for name in STATE_FILES:
        if not isinstance(load_state_file(d / name), dict):
            raise CheckpointError(f"{d / name}: not a state dict")
    for path in sorted(d.glob(RNG_NAME.format("*"))):
        rng_states(path)
    return read_progress(d / PROGRESS_NAME, progress_type)


def load_state_file(path: Path, allowed: list | None = None):
    """A torch.save file unpickled with weights_only (no code runs), `allowed` globals aside."""
    try:
        with torch.serialization.safe_globals(allowed or []):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged or crafted file fails in the zip reader or the unpickler, in many ways
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: cannot be loaded ({first[:300]})") from None


def rng_states(path: Path) -> dict:
    """An Accelerate RNG state file: Python's, NumPy's and torch's CPU generator states."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; this process's RNG states are not in the checkpoint")
    states = load_state_file(path, NUMPY_RNG_GLOBALS)
    if not isinstance(states, dict) or not set(RNG_KEYS) <= set(states) or not isinstance(states["torch_manual_seed"], torch.Tensor):
        raise CheckpointError(f"{path}: not an RNG state file (it needs {', '.join(RNG_KEYS)})")
    return states


def read_progress(path: Path, progress_type: type):
    """progress.json as a `progress_type` dataclass, whose fields are counts (non-negative ints) and lists
    of names, each of the type of its default."""
    defaults = asdict(progress_type())
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot be read as JSON ({e})") from None
    if not isinstance(data, dict) or set(data) != set(defaults):
        raise CheckpointError(f"{path}: expected a JSON object with the keys {sorted(defaults)}")
    for key, default in defaults.items():
        value = data[key]
        if isinstance(default, list):
            ok, expected = isinstance(value, list) and all(isinstance(v, str) for v in value), "a list of names"
        else:
            ok, expected = type(value) is type(default) and value >= 0, "a count (an integer, 0 or more)"
        if not ok:
            raise CheckpointError(f"{path}: {key} is {value!r:.80}, not {expected}")
    return progress_type(**data)


def check_rng_restored(directory: str | Path, process_index: int) -> None:
    """After Accelerator.load_state: this process's generators hold the checkpoint's states. Accelerate
    catches any error reading them and goes on with other states; the run would then not repeat the
    interrupted one while saying it resumed it."""
    path = Path(directory) / RNG_NAME.format(process_index)
    states = rng_states(path)
    restored = (
        random.getstate() == states["random_state"]
        and np.array_equal(np.random.get_state()[1], states["numpy_random_seed"][1])
        and torch.equal(torch.get_rng_state(), states["torch_manual_seed"])
    )
    if not restored:
        raise CheckpointError(f"{path}: its RNG states were not restored, so the run would not resume exactly")
