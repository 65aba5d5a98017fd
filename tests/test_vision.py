"""Any transformers vision model with patch features loads as a frozen encoder, with its own preprocessing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adapters.vision import load_vision


def _save(kind: str, path):
    import transformers as T

    torch.manual_seed(0)
    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
    if kind == "clip":
        model = T.CLIPVisionModel(T.CLIPVisionConfig(**small))
        T.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    elif kind == "siglip":
        model = T.SiglipVisionModel(T.SiglipVisionConfig(**small))
    elif kind == "vit":
        model = T.ViTModel(T.ViTConfig(**small), add_pooling_layer=False)
    elif kind == "dinov2":
        model = T.Dinov2Model(T.Dinov2Config(**small))
    model.save_pretrained(path)
    return model


# Patch tokens per 32x32 image at patch 8: 16, plus a class token where the model has one.
@pytest.mark.parametrize("kind,tokens", [("clip", 17), ("siglip", 16), ("vit", 17), ("dinov2", 17)])
def test_hf_vision_models_encode_patches_frozen(kind, tokens, tmp_path):
    _save(kind, tmp_path / kind)
    vision = load_vision(str(tmp_path / kind))
    frames = np.random.default_rng(0).integers(0, 256, (3, 40, 56, 3), dtype=np.uint8)
    px = vision.preprocess(frames)
    assert px.shape == (3, 3, 32, 32) and px.dtype == torch.float32
    feats = vision.encode(px)
    assert feats.shape == (3, tokens, 16) and vision.width == 16
    assert not any(p.requires_grad for p in vision.parameters())
    vision.train()
    assert not any(m.training for m in vision.modules())


def test_layer_choice_reads_that_hidden_state(tmp_path):
    model = _save("vit", tmp_path / "vit").eval()
    last = load_vision(str(tmp_path / "vit"))
    second_to_last = load_vision(str(tmp_path / "vit"), layer=-2)
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        hidden = model(pixel_values=px, output_hidden_states=True).hidden_states
    assert torch.allclose(second_to_last.encode(px), hidden[-2], atol=1e-6)
    assert not torch.allclose(last.encode(px), hidden[-2], atol=1e-3)


def test_clip_uses_its_own_image_processor_and_a_chosen_resolution_overrides_it(tmp_path):
    _save("clip", tmp_path / "clip")
    own = load_vision(str(tmp_path / "clip"))
    assert own.processor is not None and own.preprocess(np.zeros((50, 70, 3), np.uint8)).shape == (1, 3, 32, 32)
    resized = load_vision(str(tmp_path / "clip"), resolution=48)
    px = resized.preprocess(np.zeros((50, 70, 3), np.uint8))
    assert resized.processor is None and px.shape == (1, 3, 48, 48)
    assert resized.encode(px).shape == (1, 1 + 6 * 6, 16)  # position embeddings interpolated to 6x6 patches
