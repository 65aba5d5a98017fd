"""Bridge directories that are damaged or crafted: each is one CheckpointError naming the file, raised
before any backbone loads or anything large is allocated."""

from __future__ import annotations

import json
import pickle
import struct

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file, save_file

import qformer.bridge
from adapters.checkpoint import CheckpointError
from qformer import Bridge, BridgeConfig, chat, cli


class Planted:
    """Unpickling this creates the file `path`: proof that a pickle was (or was not) unpickled."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def saved(tiny_dirs, tmp_path, monkeypatch):
    """A real tiny bridge directory; loading a backbone from now on fails the test, so every error below
    is shown to come before any model loads."""
    torch.manual_seed(0)
    Bridge(tiny_config(tiny_dirs)).save_pretrained(tmp_path / "b")

    def no_backbone(*args, **kwargs):
        raise AssertionError("a backbone was loaded before the bridge directory was checked")

    monkeypatch.setattr(qformer.bridge, "load_vision", no_backbone)
    monkeypatch.setattr(qformer.bridge, "load_llm", no_backbone)
    return tmp_path / "b"


def _error(directory) -> str:
    with pytest.raises(CheckpointError) as e:
        Bridge.from_pretrained(directory)
    return str(e.value)


def _header(entries: dict) -> bytes:
    raw = json.dumps(entries).encode()
    return struct.pack("<Q", len(raw)) + raw


def test_a_header_length_of_a_terabyte_is_refused_before_it_is_read(saved):
    (saved / "bridge.safetensors").write_bytes(struct.pack("<Q", 2**40) + b"{}")
    assert _error(saved) == (
        f"{saved}/bridge.safetensors: not a safetensors file (its first 8 bytes give a 1099511627776-byte header; "
        f"the file has 10 bytes and a header may have at most 16777216)"
    )


def test_a_header_describing_a_4_tib_tensor_is_refused(saved):
    entry = {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 2**42]}
    (saved / "bridge.safetensors").write_bytes(_header({"qformer.query_tokens": entry}) + bytes(8))
    assert _error(saved) == (
        f"{saved}/bridge.safetensors: tensor 'qformer.query_tokens' (F32 [1048576, 1048576], 4398046511104 bytes) "
        "does not fit its data range [0, 4398046511104] in the file's 8 bytes of data"
    )


@pytest.mark.parametrize(
    "vocab_size, problem",
    [
        (10**11, "qformer.vocab_size is 100000000000, outside the sane range [1, 1000000]"),
        (1e11, "qformer.vocab_size must be int, not 100000000000.0"),
    ],
)
def test_a_vocabulary_of_1e11_tokens_is_refused_before_any_module_is_built(saved, vocab_size, problem):
    config = json.loads((saved / "bridge_config.json").read_text())
    config["qformer"]["vocab_size"] = vocab_size
    (saved / "bridge_config.json").write_text(json.dumps(config))
    assert _error(saved) == f"{saved}/bridge_config.json: not a valid bridge config: {problem}"


@pytest.mark.parametrize(
    "field, value, problem",
    [
        ("llm_width", "576", "llm_width must be int, not '576'"),
        ("num_frames", True, "num_frames must be int, not True"),
        ("lora", {"r": 10**9}, "lora.r is 1000000000, outside the sane range [1, 4096]"),
        ("qformer", {"dropout": -0.5}, "qformer.dropout is -0.5, outside the sane range [0.0, 1.0]"),
        ("qformer", {"num_heads": 5}, "Q-Former hidden size 32 is not a multiple of 5 heads"),
    ],
)
def test_config_fields_of_wrong_types_or_sizes_are_named(saved, field, value, problem):
    config = json.loads((saved / "bridge_config.json").read_text())
    config[field] = config[field] | value if isinstance(value, dict) and config[field] else value
    (saved / "bridge_config.json").write_text(json.dumps(config))
    assert _error(saved) == f"{saved}/bridge_config.json: not a valid bridge config: {problem}"


@pytest.mark.parametrize("write", ["torch.save", "pickle"])
def test_a_pickle_where_the_weights_belong_is_refused_and_never_unpickled(saved, tmp_path, write):
    weights, planted = saved / "bridge.safetensors", tmp_path / "planted"
    if write == "torch.save":
        torch.save({"qformer.query_tokens": torch.zeros(1, 4, 32), "x": Planted(planted)}, weights)
    else:
        weights.write_bytes(pickle.dumps(Planted(planted)))
    assert _error(saved).startswith(f"{weights}: not a safetensors file (its first 8 bytes give a ")
    assert not planted.exists()


def test_nan_weights_are_refused(saved):
    state = load_file(str(saved / "bridge.safetensors"))
    state["qformer.layers.1.mlp_query.fc_in.bias"][3] = float("nan")
    save_file(state, str(saved / "bridge.safetensors"))
    assert _error(saved) == f"{saved}/bridge.safetensors: qformer.layers.1.mlp_query.fc_in.bias holds NaN or infinite values"


def test_a_truncated_weights_file_is_refused(saved):
    weights = saved / "bridge.safetensors"
    data = weights.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    # The tensor whose data ends the file loses its last bytes.
    name, last = max(json.loads(data[8 : 8 + n]).items(), key=lambda item: item[1]["data_offsets"][1])
    weights.write_bytes(data[:-10])
    assert _error(saved) == (
        f"{weights}: tensor {name!r} ({last['dtype']} {last['shape']}, {4 * last['shape'][0]} bytes) does not fit its data "
        f"range {last['data_offsets']} in the file's {len(data) - 8 - n - 10} bytes of data"
    )
    weights.write_bytes(data[: 8 + n // 2])
    assert _error(saved) == (
        f"{weights}: not a safetensors file (its first 8 bytes give a {n}-byte header; the file has {8 + n // 2} bytes "
        f"and a header may have at most 16777216)"
    )
    weights.write_bytes(data + bytes(4))
    assert (
        _error(saved)
        == f"{weights}: the tensors take {len(data) - 8 - n} bytes of data but the file holds {len(data) - 4 - n} (truncated or padded)"
    )


def test_a_header_that_is_not_json_is_refused(saved):
    (saved / "bridge.safetensors").write_bytes(struct.pack("<Q", 4) + b"\xff{[:")
    assert _error(saved) == f"{saved}/bridge.safetensors: not a safetensors file (its header is not JSON)"


def test_weights_of_other_shapes_names_or_dtypes_than_the_config_implies_are_refused(saved):
    weights = saved / "bridge.safetensors"
    state = load_file(str(weights))
    save_file(state | {"qformer.query_tokens": torch.zeros(1, 5, 32)}, str(weights))
    assert _error(saved) == f"{weights}: qformer.query_tokens has shape (1, 5, 32), {saved}/bridge_config.json implies (1, 4, 32)"
    save_file(state | {"qformer.query_tokens": torch.zeros(1, 4, 32, dtype=torch.int64)}, str(weights))
    assert _error(saved) == f"{weights}: qformer.query_tokens is I64; bridge weights are floating point (F32, F16, BF16, F64)"
    save_file(state | {"extra": torch.zeros(1)}, str(weights))
    assert _error(saved) == f"{weights}: weights do not fit {saved}/bridge_config.json; missing [], unexpected ['extra']"


def test_data_ranges_that_overlap_are_refused(saved):
    entry = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    (saved / "bridge.safetensors").write_bytes(_header({"a": entry, "b": entry}) + bytes(8))
    assert _error(saved) == f"{saved}/bridge.safetensors: the tensors' data ranges overlap or leave a gap at byte 8"


def test_the_command_lines_say_a_crafted_bridge_in_one_line(saved, tmp_path, capsys):
    (saved / "bridge.safetensors").write_bytes(struct.pack("<Q", 2**40))
    message = (
        f"{saved}/bridge.safetensors: not a safetensors file (its first 8 bytes give a 1099511627776-byte header; "
        "the file has 8 bytes and a header may have at most 16777216)"
    )
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (32, 32)).save(image)
    assert cli.main(["recaption", str(image), "--out", str(tmp_path / "out.jsonl"), "--bridge", str(saved)]) == 2
    assert capsys.readouterr().err == f"qformer recaption: error: {message}\n"
    with pytest.raises(SystemExit) as e:
        chat.load_bridge(str(saved))
    assert str(e.value) == f"qformer chat: cannot load the bridge {saved}: {message}"


def test_a_config_that_is_not_json_or_too_large_to_be_one_is_refused(saved):
    config = saved / "bridge_config.json"
    config.write_text("{")
    assert _error(saved) == (
        f"{config}: not a valid bridge config: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"
    )
    config.write_text(" " * (2**20 + 1))
    assert _error(saved) == f"{config}: 1048577 bytes, too large for a bridge config (at most 1048576)"


def test_a_frame_sampling_the_clip_reader_does_not_know_is_refused():
    config = BridgeConfig(frame_sampling="middle")
    with pytest.raises(ValueError, match="frame_sampling must be one of centres, ends, not 'middle'"):
        config.validate()
    BridgeConfig(frame_sampling="ends").validate()
