"""Typed configs of the trainable part. Each default is written once, here."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


@dataclass
class QFormerConfig:
    """The query transformer. Defaults match the MiniLM-L6 initialisation (BERT-style, 384 wide)."""

    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    num_queries: int = 32
    # BLIP-2 puts cross-attention to the vision features in every other layer.
    cross_attention_every: int = 2
    vision_width: int = 1280
    vocab_size: int = 30522
    max_text_len: int = 512
    # Learned per-frame embedding added to the frozen features, so queries can see frame order.
    max_frames: int = 32
    # Video as tubelets: each place of the frame grid becomes ONE token holding its features in all
    # `tubelet_frames` frames (that many times vision_width wide), so a token says how its place changes
    # over the clip, which is what motion is, and attention never has to find the same place in separate
    # frames (ViViT's tubelet embedding, over frozen per-frame features; 4x fewer tokens at 4 frames).
    # A clip of another length is read at that many evenly spaced frames, an image as a still clip.
    # 0: every frame's tokens are separate (BLIP-2), told apart by the temporal embedding.
    tubelet_frames: int = 0
    # Fixed 2-D sine-cosine positions added to the vision tokens (as DETR does for CNN features): a CNN's
    # feature map does not say where a token is, so left, right and which object is leftmost are
    # invisible without them. ViT features carry positions already. Needs a square token grid.
    grid_positions: bool = False
    # The grid the positions count in: 0 for the token grid itself. A Q-Former trained on an 8 x 8 grid
    # and moved to a finer one (the same encoder at a higher resolution) keeps grid_side 8, so token i of
    # a 16 x 16 grid sits at 8i/16, where its corner falls on the grid it learnt, not at i.
    grid_side: int = 0
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1
    hidden_act: str = "gelu"
    # LayerNorm over the frozen features (BLIP-2's ln_vision). Off when the encoder already ends in one,
    # as transformers' BLIP-2 vision tower does.
    vision_norm: bool = True
    pad_token_id: int = 0
    # BLIP-2's stage-1 heads (ITC projections, ITM classifier, ITG language-model head); a stage-1
    # bridge carries them, a generative bridge needs none. embed_dim is ITC's shared space.
    stage1_heads: bool = False
    embed_dim: int = 256


@dataclass
class LoraConfig:
    """Optional LoRA on the frozen LLM, through peft."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    # Module names of the LLM to adapt, or peft's "all-linear" (every linear layer but the output head).
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])


@dataclass
class BridgeConfig:
    """Everything needed to rebuild a bridge: the Q-Former and references to the frozen backbones."""

    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    # Specs understood by adapters.load_vision / adapters.load_llm: a built-in offline name,
    # a local directory or a hub id.
    vision: str = "efficientnet-lite0"
    llm: str = "smollm2-135m-instruct"
    vision_layer: int | None = None
    vision_resolution: int | None = None
    llm_width: int = 576
    lora: LoraConfig | None = None
    # InstructBLIP: the question (or caption prompt) also enters the Q-Former, tokenised by this tokenizer.
    instruct: bool = False
    qformer_tokenizer: str | None = None
    # Prompt used by Bridge.caption when none is given.
    caption_prompt: str = "Describe the clip."
    # Answer every question with the bridge's own caption of the clip as the chat's first turn (trained
    # with train.py --caption-first). A caption binds each attribute to its object, which the visual prompt
    # alone leaves the LLM to do; answering from the caption carries that binding over to the answers.
    caption_first: bool = False
    # System message of every chat; None leaves the LLM's template to its default. "" drops a template's
    # built-in one (SmolLM2's costs 20 tokens of every training step).
    system_prompt: str | None = None
    num_frames: int = 8

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "BridgeConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"bridge config: unknown keys {sorted(unknown)}")
        d = dict(d)
        d["qformer"] = QFormerConfig(**d.get("qformer", {}))
        if d.get("lora") is not None:
            d["lora"] = LoraConfig(**d["lora"])
        return cls(**d)
