"""Typed configs of the trainable part. Each default is written once, here."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

# Generation: the longest caption or answer unless asked otherwise (a two-object WORLD.md caption is about 17
# SmolLM2 tokens), and how many clips or images go through the models in one call when captioning. Each
# decoding step reads every weight of the LLM whatever the number of rows, so wide batches cost little more
# per step, with the same captions (bench/README.md, "recaption_speed", gives the figures at each width).
MAX_NEW_TOKENS = 48
CAPTION_BATCH_SIZE = 32

# The rank of the low-rank attention updates a scorer learns (train.py --train attention; attention_rank below).
SCORER_ATTENTION_RANK = 16

# Sane bounds (inclusive) of every numeric field. A bridge directory is read from disk and may be crafted,
# and the Q-Former allocates what its config says (vocab_size x hidden_size word embeddings, layers of
# hidden_size x intermediate_size, ...), so validate() checks each size before any module is built. The
# highs stand far above any real Q-Former (BLIP-2's: 768 wide, 12 layers, 32 queries, a 30523-token
# vocabulary) and far below sizes that would exhaust a machine before the weights file is even compared.
BOUNDS = {
    "hidden_size": (1, 8192),
    "num_layers": (1, 128),
    "num_heads": (1, 512),
    "intermediate_size": (1, 65536),
    "num_queries": (1, 4096),
    "cross_attention_every": (1, 128),
    "vision_width": (1, 16384),
    "vocab_size": (1, 1_000_000),  # multilingual BERTs have 250k tokens
    "max_text_len": (1, 65536),
    "max_frames": (1, 4096),
    "tubelet_frames": (0, 4096),
    "grid_side": (0, 4096),
    "layer_norm_eps": (1e-30, 1.0),
    "dropout": (0.0, 1.0),
    "pad_token_id": (0, 999_999),
    "embed_dim": (1, 8192),
    "attention_rank": (0, 4096),
    "r": (1, 4096),
    "alpha": (1, 1_000_000),
    "vision_layer": (-1024, 1024),
    "vision_resolution": (1, 16384),
    "llm_width": (1, 65536),
    "num_frames": (1, 4096),
}


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
    # InstructBLIP-Video: the queries read each frame alone and the LLM gets every frame's query outputs
    # in turn (frames x num_queries tokens), with no temporal modelling. Off: the queries read the whole clip.
    frame_queries: bool = False
    pad_token_id: int = 0
    # BLIP-2's stage-1 heads (ITC projections, ITM classifier, ITG language-model head); a stage-1
    # bridge carries them, a generative bridge needs none. embed_dim is ITC's shared space.
    stage1_heads: bool = False
    embed_dim: int = 256
    # Low-rank updates (LoRA) of this rank to every attention weight: W + B A, B zero at first. A scorer
    # trained from its bridge's Q-Former learns these alone (train.py --train attention), so beside its
    # bridge it stores them (1.2 MB of the default bridge's scorer/) rather than the attention weights (14.5 MB
    # in half precision, by their parameter count).
    # 0: none, the plain weights.
    attention_rank: int = 0

    def validate(self) -> None:
        _validate(self, "qformer.")
        if self.pad_token_id >= self.vocab_size:
            raise ValueError(f"qformer.pad_token_id {self.pad_token_id} is not a token of its {self.vocab_size}-token vocabulary")


@dataclass
class LoraConfig:
    """Optional LoRA on the frozen LLM, through peft."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    # Module names of the LLM to adapt, or peft's "all-linear" (every linear layer but the output head).
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])

    def validate(self) -> None:
        _validate(self, "lora.")


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
    num_frames: int = 4
    # How those frames spread over a clip: "centres" of equal segments (the shipped bridge's), or "ends", from the
    # first frame to the last (adapters/video.py), for clips whose first frame decides something.
    frame_sampling: str = "centres"

    def validate(self) -> None:
        """A ValueError naming the first field of a wrong type or beyond its BOUNDS, here or in the nested configs."""
        _validate(self)
        from adapters.video import SAMPLINGS  # the clip reader knows its samplings; PyAV loads with it

        if self.frame_sampling not in SAMPLINGS:
            raise ValueError(f"frame_sampling must be one of {', '.join(SAMPLINGS)}, not {self.frame_sampling!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> BridgeConfig:
        """The config a dict (parsed JSON) describes, validated."""
        d = dict(_known(cls, d, "bridge config"))
        d["qformer"] = QFormerConfig(**_known(QFormerConfig, d.get("qformer", {}), "qformer"))
        if d.get("lora") is not None:
            d["lora"] = LoraConfig(**_known(LoraConfig, d["lora"], "lora"))
        config = cls(**d)
        config.validate()
        return config


def _known(cls, d, where: str) -> dict:
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(d).__name__}")
    unknown = set(d) - {f.name for f in fields(cls)}
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
    return d


def _validate(config, where: str = "") -> None:
    """Each field's value against its annotation ("int", "str | None", "list[str] | str", a nested config)
    and its BOUNDS. bool is no int here, and an int is a float: JSON writes 0.0 as 0."""
    for f in fields(config):
        value, name = getattr(config, f.name), f"{where}{f.name}"
        kinds = [k.strip() for k in f.type.split("|")]
        if value is None and "None" in kinds:
            continue
        if isinstance(value, (QFormerConfig, LoraConfig)) and type(value).__name__ in kinds:
            value.validate()
            continue
        integer = isinstance(value, int) and not isinstance(value, bool)
        ok = {
            "int": integer,
            "float": integer or isinstance(value, float) and math.isfinite(value),
            "bool": isinstance(value, bool),
            "str": isinstance(value, str),
            "list[str]": isinstance(value, list) and all(isinstance(v, str) for v in value),
        }
        if not any(ok.get(k, False) for k in kinds):
            raise ValueError(f"{name} must be {' or '.join(kinds)}, not {value!r:.80}")
        if f.name in BOUNDS:
            low, high = BOUNDS[f.name]
            if not low <= value <= high:
                raise ValueError(f"{name} is {value!r:.40}, outside the sane range [{low}, {high}]")
