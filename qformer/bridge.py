"""The bridge: frozen vision encoder -> Q-Former -> projection -> frozen causal LLM.

    frames (B, T, 3, H, W) --vision.encode--> (B, T, N, Dv) --Q-Former--> (B, Q, Dq)
        --projection--> (B, Q, Dl) soft visual prompt, spliced into the LLM's token embeddings.

Only the Q-Former (with its queries and temporal embedding), the projection and optional LoRA
weights train; save_pretrained writes just those plus references to the backbones.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from adapters.checkpoint import CheckpointError, safetensors_header
from adapters.llm import decoder_targets, load_llm
from adapters.offline import minilm_dir
from adapters.vision import load_vision

from .config import CAPTION_BATCH_SIZE, MAX_NEW_TOKENS, BridgeConfig
from .convert import checkpoint_bridge_config, checkpoint_weights
from .model import QFormer, QFormerHeads, count_parameters
from .scorer import SCORER_DIR, Scorer, clip_features, load_tokenizer, match_clips, scorer_weights

# The trained demo bridge shipped in the repository, used when no bridge is named.
DEFAULT_BRIDGE = Path(__file__).resolve().parent.parent / "demos" / "bridge"
CONFIG_NAME = "bridge_config.json"
WEIGHTS_NAME = "bridge.safetensors"
# A bridge config is a page of JSON; a larger file is not one.
MAX_CONFIG_BYTES = 2**20
# The dtypes a bridge's trainable weights are saved in (save_pretrained's dtype casts floating weights).
WEIGHT_DTYPES = ("F32", "F16", "BF16", "F64")


def bridge_or_default(spec: str | None) -> str:
    """`spec` when given, else the shipped demo bridge; an error saying what to pass when that is missing."""
    if spec is not None:
        return str(spec)
    if not DEFAULT_BRIDGE.is_dir():
        raise ValueError(
            f"no bridge named and the default bridge ({DEFAULT_BRIDGE}) is not there; "
            "pass --bridge DIR, a directory written by train.py or Bridge.save_pretrained"
        )
    return str(DEFAULT_BRIDGE)


def trainable_parts(config: BridgeConfig, init: bool = True) -> dict[str, nn.Module]:
    """The modules a bridge trains and saves, built from the config alone: the Q-Former, the projection into
    the LLM and, when the config asks, the stage-1 heads (ITC/ITM/ITG; generation never uses them).
    init=False: the Q-Former's and the heads' own initial weights are not drawn (QFormer's init)."""
    q = config.qformer
    parts = {"qformer": QFormer(q, init), "projection": nn.Linear(q.hidden_size, config.llm_width)}
    if q.stage1_heads:
        parts["heads"] = QFormerHeads(q, init)
    return parts


def trainable_shapes(config: BridgeConfig) -> dict[str, tuple[int, ...]]:
    """{name: shape} of the weights save_pretrained writes for this config, LoRA adapters aside (their
    shapes depend on the LLM). Built on the meta device: nothing is allocated, whatever the config says,
    and no initial weight drawn (drawing them there imports torch._dynamo, a second of every cold start)."""
    with torch.device("meta"):
        parts = trainable_parts(config, init=False)
    return {f"{part}.{k}": tuple(v.shape) for part, module in parts.items() for k, v in module.state_dict().items()}


def read_bridge_config(directory: str | os.PathLike) -> BridgeConfig:
    """A bridge directory's config, validated (types, sane sizes); a CheckpointError naming the file otherwise."""
    path = Path(directory) / CONFIG_NAME
    try:
        size = path.stat().st_size
        raw = path.read_bytes() if size <= MAX_CONFIG_BYTES else None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
    if raw is None:
        raise CheckpointError(f"{path}: {size} bytes, too large for a bridge config (at most {MAX_CONFIG_BYTES})")
    try:
        return BridgeConfig.from_dict(json.loads(raw))
    except ValueError as e:  # not JSON, unknown keys, wrong types, sizes beyond bounds
        raise CheckpointError(f"{path}: not a valid bridge config: {e}") from None


def read_bridge_dir(
    directory: str | os.PathLike, base: dict[str, torch.Tensor] | None = None
) -> tuple[BridgeConfig, dict[str, torch.Tensor]]:
    """The config and trainable weights of a bridge directory, each checked before anything is allocated:
    the config's types and sizes, then the weights file's header against the shapes that config implies,
    then the weights' values (finite). Anything wrong is one CheckpointError naming the file.

    base: weights to take those the file does not hold from (a scorer stores only what differs from its
    bridge's: read_scorer_dir)."""
    d = Path(directory)
    config = read_bridge_config(d)
    path = d / WEIGHTS_NAME
    header = safetensors_header(path)
    try:
        expected = trainable_shapes(config)
    except ValueError as e:  # sizes that do not go together, e.g. a width no multiple of the heads
        raise CheckpointError(f"{d / CONFIG_NAME}: not a valid bridge config: {e}") from None
    # LoRA adapters' shapes depend on the LLM: load_trainable checks them once it is loaded.
    lora = {k for k in header if config.lora is not None and k.startswith("llm.") and "lora_" in k}
    missing, unexpected = sorted(set(expected) - set(header) - set(base or {})), sorted(set(header) - set(expected) - lora)
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit {d / CONFIG_NAME}; missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, (dtype, shape) in header.items():
        if dtype not in WEIGHT_DTYPES:
            raise CheckpointError(f"{path}: {name} is {dtype}; bridge weights are floating point ({', '.join(WEIGHT_DTYPES)})")
        if name in expected and shape != expected[name]:
            raise CheckpointError(f"{path}: {name} has shape {shape}, {d / CONFIG_NAME} implies {expected[name]}")
    state = load_file(str(path))
    for name, v in state.items():
        if not torch.isfinite(v).all():
            raise CheckpointError(f"{path}: {name} holds NaN or infinite values")
    for name in set(expected) - set(state):
        if tuple(base[name].shape) != expected[name]:
            raise CheckpointError(f"{path}: {name} is not held and its bridge's has shape {tuple(base[name].shape)}, not {expected[name]}")
        state[name] = base[name]
    return config, state


def read_scorer_dir(directory: str | os.PathLike) -> tuple[BridgeConfig, dict[str, torch.Tensor]]:
    """The config and weights of the scorer in `directory`/scorer, checked as read_bridge_dir checks a bridge;
    the weights it does not hold are its bridge's, in `directory`."""
    d = Path(directory)
    return read_bridge_dir(d / SCORER_DIR, base=read_bridge_dir(d)[1])


def heads_fit(config: BridgeConfig) -> bool:
    """Whether a bridge's own stage-1 heads fit its Q-Former: it has them and was never trained in stage 2.
    Stage 2 now leaves the heads behind, but bridges trained before it did kept heads their Q-Former has
    since left (the first default bridge's score true and one-slot-wrong captions at chance); stage 1 never
    sets LoRA, an instructed Q-Former or caption-first answers, so any of these marks such a bridge."""
    return config.qformer.stage1_heads and config.lora is None and not config.instruct and not config.caption_first


def load_scorer(directory: str | os.PathLike) -> Scorer | None:
    """The scorer of the bridge in `directory` (its scorer/, else the bridge itself when it carries stage-1
    heads; None without either), built without the bridge's LLM and vision encoder (the scorer loads the
    encoder itself if it is given clips): text-to-clip search over stored features needs neither."""
    d = Path(directory)
    if (d / SCORER_DIR / CONFIG_NAME).exists():
        return Scorer.from_state(*read_scorer_dir(d))
    config, state = read_bridge_dir(d)
    return Scorer.from_state(config, state) if heads_fit(config) else None


def save_scorer(
    scorer: Bridge, directory: str | os.PathLike, dtype: torch.dtype | None = None, init: str | os.PathLike | None = None
) -> None:
    """Write the stage-1 bridge `scorer` into `directory`/scorer as the scorer of the bridge there: its config
    and the Q-Former and head weights in which it differs from the bridge it was trained from (dtype as
    save_pretrained's). init: that bridge's directory, when it is not `directory` (a scorer trained on an
    earlier stage of the bridge it is saved beside); the weights it kept from there are read from `directory`'s."""
    if scorer.heads is None:
        raise ValueError("a scorer is a bridge with stage-1 heads (train.py --stage 1); this one has none")
    d = Path(directory) / SCORER_DIR
    start = read_bridge_dir(directory if init is None else init)[1]
    trained = scorer.trainable_state_dict()
    state = scorer_weights(trained, start, dtype)
    if init is not None:
        # What the scorer does not hold it takes, once loaded, from the bridge beside it: that bridge's config
        # and weights header must carry each such weight in its shape (its values need not be read).
        read_bridge_config(directory)
        beside = safetensors_header(Path(directory) / WEIGHTS_NAME)
        taken = {k: tuple(v.shape) for k, v in trained.items() if k.startswith(("qformer.", "heads.")) and k not in state}
        lacking = sorted(k for k, shape in taken.items() if beside.get(k, ("", None))[1] != shape)
        if lacking:
            raise CheckpointError(
                f"{Path(directory) / WEIGHTS_NAME}: lacks or reshapes {len(lacking)} weights the scorer would take from it "
                f"(e.g. {lacking[:3]}): save a scorer beside a later stage of the bridge it learnt on"
            )
    d.mkdir(parents=True, exist_ok=True)
    save_file(state, str(d / WEIGHTS_NAME))
    (d / CONFIG_NAME).write_text(json.dumps(scorer.config.to_dict(), indent=2) + "\n")


def local_source(spec: str | os.PathLike) -> Path:
    """The directory `spec` names: itself, or a hub id's snapshot (downloaded when the hub is reachable)."""
    d = Path(spec)
    if d.is_dir():
        return d
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(snapshot_download(str(spec)))
    except HFValidationError:
        raise FileNotFoundError(f"{spec}: no such bridge directory (nor a hub id)") from None


def read_config(directory: str | os.PathLike) -> BridgeConfig:
    """The validated config of a bridge directory or of a transformers BLIP-2 / InstructBLIP (-Video)
    checkpoint directory, read without loading any weights."""
    d = Path(directory)
    if (d / CONFIG_NAME).exists():
        return read_bridge_config(d)
    if (d / "config.json").exists():
        return checkpoint_bridge_config(d)
    raise FileNotFoundError(
        f"{d}: not a bridge directory (no {CONFIG_NAME}) nor a transformers BLIP-2 or InstructBLIP checkpoint (no config.json)"
    )


def read_source(directory: str | os.PathLike) -> tuple[BridgeConfig, dict[str, torch.Tensor]]:
    """The config and trainable weights of either kind of directory read_config reads, checked before any
    backbone loads: a bridge directory as read_bridge_dir checks it; a checkpoint's config against the
    bounds, its weights files' headers (adapters.checkpoint), then the weights' shapes against those the
    config implies and their values (finite). Anything wrong is one CheckpointError naming the file."""
    d = Path(directory)
    if (d / CONFIG_NAME).exists():
        return read_bridge_dir(d)
    config = read_config(d)
    state = checkpoint_weights(d, config)
    for name, shape in trainable_shapes(config).items():
        if tuple(state[name].shape) != shape:
            raise CheckpointError(f"{d}: {name} has shape {tuple(state[name].shape)}, {d / 'config.json'} implies {shape}")
        if not torch.isfinite(state[name]).all():
            raise CheckpointError(f"{d}: {name} holds NaN or infinite values")
    return config, state


@dataclass
class BridgeOutput:
    logits: torch.Tensor | None  # (B, L, V) at the text positions; None when only the loss was asked for
    loss: torch.Tensor | None = None


class Bridge(nn.Module):
    # Where from_pretrained read this bridge; its own scorer, if it has one, is in directory/scorer.
    directory: Path | None = None

    def __init__(self, config: BridgeConfig, vision: nn.Module | None = None, llm: nn.Module | None = None, llm_kwargs: dict | None = None):
        """vision, llm: backbones already loaded, else loaded from the config; llm_kwargs: how load_llm loads
        the LLM on this machine (qformer.build.llm_loading: 4 or 8 bits), which no config records."""
        super().__init__()
        config.validate()  # sizes beyond sane bounds would be allocated below
        self.config = config
        self.vision = vision if vision is not None else load_vision(config.vision, config.vision_layer, config.vision_resolution)
        self.llm = llm if llm is not None else load_llm(config.llm, lora=config.lora, **(llm_kwargs or {}))
        q = config.qformer
        if self.vision.width != q.vision_width:
            raise ValueError(
                f"vision encoder {config.vision!r} gives {self.vision.width}-wide features but this bridge's "
                f"Q-Former reads {q.vision_width}-wide ones"
            )
        if self.llm.width != config.llm_width:
            raise ValueError(
                f"language model {config.llm!r} is {self.llm.width} wide but this bridge projects into "
                f"{config.llm_width}; re-bridge it (train.py --init-from) to change LLM"
            )
        parts = trainable_parts(config)
        self.qformer, self.projection, self.heads = parts["qformer"], parts["projection"], parts.get("heads")
        if config.instruct and not config.qformer_tokenizer:
            raise ValueError("an instructed bridge needs config.qformer_tokenizer (e.g. 'minilm' or a BERT directory)")
        self.qformer_tokenizer = None
        if config.qformer_tokenizer:
            from transformers import AutoTokenizer

            # "minilm" names the offline MiniLM by role, so a bridge config holds no machine's site-packages path.
            spec = minilm_dir() if config.qformer_tokenizer == "minilm" else config.qformer_tokenizer
            self.qformer_tokenizer = AutoTokenizer.from_pretrained(spec)

    # ---- construction and persistence -------------------------------------------------------------

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Q-Former, projection and LoRA weights: all a bridge adds to its frozen backbones."""
        state = {f"qformer.{k}": v for k, v in self.qformer.state_dict().items()}
        state.update({f"projection.{k}": v for k, v in self.projection.state_dict().items()})
        if self.heads is not None:
            state.update({f"heads.{k}": v for k, v in self.heads.state_dict().items()})
        state.update({f"llm.{k}": p.detach() for k, p in self.llm.named_parameters() if "lora_" in k})
        return state

    def save_pretrained(self, directory: str | os.PathLike, dtype: torch.dtype | None = None, state: dict | None = None) -> None:
        """Config and trainable weights; dtype (e.g. torch.float16 to halve a shipped file) casts floating
        weights on the way out, and from_pretrained casts them back to the bridge's own dtype. state: the
        trainable weights to write, when this bridge holds only shards of them (FSDP; train.py gathers them)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in (state or self.trainable_state_dict()).items()}
        if dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        save_file(state, str(d / WEIGHTS_NAME))
        (d / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, vision: nn.Module | None = None, llm: nn.Module | None = None, llm_kwargs: dict | None = None
    ) -> Bridge:
        """The bridge in `directory` (or a hub id): one save_pretrained (or train.py) wrote, or a transformers
        checkpoint of Blip2ForConditionalGeneration, InstructBlipForConditionalGeneration or
        InstructBlipVideoForConditionalGeneration saved with its processor, whose every part it takes (its
        LLM decoder-only or encoder-decoder, reading prompts verbatim). Its files are checked before any
        backbone loads (read_source): a damaged or crafted one is a CheckpointError naming the file."""
        d = local_source(directory)
        config, state = read_source(d)
        bridge = cls(config, vision, llm, llm_kwargs)
        bridge.load_trainable(state, source=str(d / WEIGHTS_NAME if (d / CONFIG_NAME).exists() else d))
        # Ready to answer, as transformers' from_pretrained is: in train mode the Q-Former's dropout would
        # make every answer a draw. Training calls train() itself.
        bridge.directory = d
        bridge.llm.lay_out_for_decoding()
        return bridge.eval()

    # A transformers BLIP-2 / InstructBLIP checkpoint is one of the directories from_pretrained reads.
    from_blip2 = from_pretrained

    def load_trainable(self, state: dict[str, torch.Tensor], source: str = "state") -> None:
        own = self.trainable_state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise CheckpointError(f"{source}: bridge weights do not fit this bridge; missing {missing[:5]}, unexpected {unexpected[:5]}")
        for k, v in state.items():
            if own[k].shape != v.shape:
                raise CheckpointError(f"{source}: {k} has shape {tuple(v.shape)}, this bridge needs {tuple(own[k].shape)}")
        with torch.no_grad():
            params = dict(self.named_parameters()) | dict(self.named_buffers())
            for k, v in state.items():
                params[k].copy_(v)

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, total) parameters, backbones included in the total."""
        return count_parameters(self)

    # ---- scores: how well a text fits a clip, clips and texts in one space (qformer/scorer.py) ------

    @property
    def scorer(self) -> Scorer | None:
        """This bridge's scorer: the one in `scorer/` beside its weights, else the bridge itself when it carries
        stage-1 heads (a stage-1 bridge; stage 2 leaves them behind), else None. Loaded on first use, so
        captioning never pays for it; it reads clips with this bridge's vision encoder."""
        if "_scorer" not in self.__dict__:  # in __dict__: a cache, no submodule of the bridge (not saved, not counted)
            self.__dict__["_scorer"] = self._load_scorer()
        return self.__dict__["_scorer"]

    def _load_scorer(self) -> Scorer | None:
        if self.directory is not None and (self.directory / SCORER_DIR / CONFIG_NAME).exists():
            config, state = read_scorer_dir(self.directory)
            mine, its = (self.config.vision, self.config.vision_layer), (config.vision, config.vision_layer)
            if mine != its or config.vision_resolution != self.config.vision_resolution:
                raise CheckpointError(f"{self.directory / SCORER_DIR}: its scorer reads {its} features, this bridge's encoder is {mine}")
            return Scorer.from_state(config, state, self.vision).to(self.projection.weight.device)
        if self.heads is None or not heads_fit(self.config):
            return None
        if self.qformer_tokenizer is None:
            raise ValueError(
                "its stage-1 heads read text with a Q-Former tokenizer and this bridge's config names none (qformer_tokenizer)"
            )
        tokenizer = load_tokenizer(self.config.qformer_tokenizer, self.config.qformer.max_text_len)
        return Scorer(self.config, self.qformer, self.heads, tokenizer, self.vision)

    def _require_scorer(self, what: str) -> Scorer:
        if self.scorer is None:
            raise ValueError(
                f"{what} needs a scorer: this bridge has no {SCORER_DIR}/ directory beside its weights and no stage-1 heads "
                "that fit its Q-Former (a stage-2 bridge's heads no longer do) "
                "(train one: train.py --stage 1 --init-from BRIDGE --stage1-losses itc,itm; qformer.bridge.save_scorer)"
            )
        return self.scorer

    def match(self, clips, texts, batch_size: int = CAPTION_BATCH_SIZE) -> list[float]:
        """How well texts[i] describes clips[i] (clips as caption() takes them), in (0, 1]: match_features."""
        features_of = lambda chunk: clip_features(self.config, self.vision, chunk, self.projection.weight.device)  # noqa: E731
        return match_clips(clips, texts, batch_size, features_of, self.match_features)

    @torch.no_grad()
    def match_features(self, features: torch.Tensor, texts: list[str], batch_size: int = CAPTION_BATCH_SIZE) -> torch.Tensor:
        """(B,) how well texts[i] describes the clip of features[i] (B, T, N, Dv), in (0, 1].

        A bridge that captions judges by its own captioning: the geometric mean of the probabilities it gives
        the text's tokens as the clip's caption (exp of minus its caption loss), so a text that names one
        slot wrong scores low wherever the bridge would caption that slot right. Its matching heads (ITM) do
        worse: trained on a stage-2 Q-Former with the captions and their one-slot changes they stayed at chance
        (bench/README.md, "matching"). A stage-1 bridge, which does not caption, matches by its ITM head."""
        if len(features) != len(texts):
            raise ValueError(f"match: {len(features)} clips and {len(texts)} texts; give one text per clip")
        if heads_fit(self.config):
            return self._require_scorer("match").match_features(features, texts)
        out = []
        for i in range(0, len(texts), batch_size):
            chunk = list(texts[i : i + batch_size])
            batch = self.answer_batch([self.config.caption_prompt] * len(chunk), chunk)
            logits = self(**batch, features=features[i : i + batch_size].to(self.projection.weight)).logits.float()
            if self.llm.is_encoder_decoder:
                targets = decoder_targets(batch["labels"])  # the decoder's logits are at its targets' own positions
            else:
                logits, targets = logits[:, :-1], batch["labels"][:, 1:]  # each token predicted from the one before it
            known = targets != -100
            logp = logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
            out.append(((logp * known).sum(1) / known.sum(1)).exp().cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def embed_clips(self, clips) -> torch.Tensor:
        """(N, Q, E): each clip's Q query features in the scorer's ITC space, L2-normalised; a clip is as similar
        to a text as its best query (qformer.scorer.similarity, BLIP-2's rule)."""
        return self._require_scorer("embed_clips").embed_clips(clips)

    def embed_texts(self, texts) -> torch.Tensor:
        """(M, E): each text's feature in the scorer's ITC space (the space of embed_clips), L2-normalised."""
        return self._require_scorer("embed_texts").embed_texts(list(texts))

    # ---- the forward path ------------------------------------------------------------------------

    def frame_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images or (B, T, 3, H, W) clips -> frozen features (B, T, N, Dv)."""
        if pixel_values.dim() == 4:
            pixel_values = pixel_values[:, None]
        if pixel_values.dim() != 5:
            raise ValueError(f"pixel_values must be (B, 3, H, W) or (B, T, 3, H, W); got {tuple(pixel_values.shape)}")
        B, T = pixel_values.shape[:2]
        feats = self.vision.encode(pixel_values.flatten(0, 1))  # (B*T, N, Dv)
        return feats.float().view(B, T, *feats.shape[1:])

    def visual_prompt(
        self,
        pixel_values: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
        instruction_ids: torch.Tensor | None = None,
        instruction_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The soft prompt (B, Q, Dl), or (B, T*Q, Dl) when the queries read each frame alone (frame_queries).
        `features` (B, T, N, Dv) skips the vision encoder (feature cache)."""
        if features is None:
            features = self.frame_features(pixel_values)
        B, T = features.shape[:2]
        if self.config.qformer.frame_queries:
            # Each frame a clip of its own, with the clip's instruction (InstructBLIP-Video).
            features = features.flatten(0, 1)[:, None]  # (B*T, 1, N, Dv)
            if instruction_ids is not None:
                instruction_ids, instruction_mask = instruction_ids.repeat_interleave(T, 0), instruction_mask.repeat_interleave(T, 0)
        hidden = self.qformer(features, instruction_ids, instruction_mask, mode="bidirectional")  # (B or B*T, Q+L, Dq)
        visual = self.projection(hidden[:, : self.config.qformer.num_queries])
        return visual.reshape(B, -1, visual.shape[-1])

    def _splice(self, visual, input_ids, attention_mask, visual_position):
        """Insert the visual prompt into each row's text embeddings at `visual_position` (default 0)."""
        text = self.llm.embed(input_ids)  # (B, L, Dl)
        B, L, D = text.shape
        Q = visual.shape[1]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if visual_position is None:
            visual_position = torch.zeros(B, dtype=torch.long, device=text.device)
        j = torch.arange(L, device=text.device)
        text_pos = j + Q * (j[None] >= visual_position[:, None])  # (B, L)
        vis_pos = visual_position[:, None] + torch.arange(Q, device=text.device)  # (B, Q)
        embeds = text.new_zeros(B, L + Q, D)
        embeds = embeds.scatter(1, text_pos[..., None].expand(-1, -1, D), text)
        embeds = embeds.scatter(1, vis_pos[..., None].expand(-1, -1, D), visual.to(text.dtype))
        mask = attention_mask.new_ones(B, L + Q).scatter(1, text_pos, attention_mask)
        return embeds, mask, text_pos

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        visual_position: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
        instruction_ids: torch.Tensor | None = None,
        instruction_mask: torch.Tensor | None = None,
        return_logits: bool = True,
    ) -> BridgeOutput:
        """Logits at the text positions (B, L, V); with labels (B, L; -100 = ignore), the LM loss.

        An encoder-decoder LLM reads the unlabelled text (BLIP-2's prefix-LM) and its logits are its
        decoder's over the labelled tokens (B, K, V) (LanguageModel.lm_loss).
        return_logits=False (with labels) returns only the loss and computes the LLM's vocabulary
        projection just from the first labelled position on: on a CPU that projection is the largest
        single cost of a training step. Left-padded answer batches (answer_batch) keep that tail short.
        """
        visual = self.visual_prompt(pixel_values, features, instruction_ids, instruction_mask)
        embeds, mask, text_pos = self._splice(visual, input_ids, attention_mask, visual_position)
        if labels is None:
            logits, loss = self.llm(embeds, mask), None
        else:
            # The labels at the sequence's positions; the visual prompt's are never targets.
            spliced = labels.new_full(mask.shape, -100).scatter(1, text_pos, labels)
            logits, loss = self.llm.lm_loss(embeds, mask, spliced, return_logits)
        if logits is not None and not self.llm.is_encoder_decoder:
            logits = logits.gather(1, text_pos[..., None].expand(-1, -1, logits.shape[-1]))  # (B, L, V)
        return BridgeOutput(logits=logits, loss=loss)

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = MAX_NEW_TOKENS,
        visual_position: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
        instruction_ids: torch.Tensor | None = None,
        instruction_mask: torch.Tensor | None = None,
        visual: torch.Tensor | None = None,
        **generate_kwargs,
    ) -> torch.Tensor:
        """Greedy unless told otherwise; returns only the new tokens (B, K), never an encoder-decoder's start
        token. Left-pad batched prompts."""
        if visual is None:  # else the soft prompt (B, Q, Dl) was computed once for several questions (answer_pixels)
            visual = self.visual_prompt(pixel_values, features, instruction_ids, instruction_mask)
        embeds, mask, _ = self._splice(visual, input_ids, attention_mask, visual_position)
        return self.llm.generate(embeds, mask, max_new_tokens=max_new_tokens, **generate_kwargs)

    # ---- high level: captions and answers from paths, PIL images, arrays -------------------------

    def caption(
        self,
        items,
        prompt: str | None = None,
        num_frames: int | None = None,
        max_new_tokens: int = MAX_NEW_TOKENS,
        batch_size: int = CAPTION_BATCH_SIZE,
        num_beams: int = 1,
    ) -> list[str]:
        """One caption per image or clip (paths, PIL images, uint8 arrays or adapters.video.Clip).

        num_beams > 1 decodes by beam search instead of greedily: slower, and on the world's two-object
        clips more often right (the README's figures)."""
        prompt = self.config.caption_prompt if prompt is None else prompt
        items = list(items) if isinstance(items, (list, tuple)) else [items]
        out: list[str] = []
        for i in range(0, len(items), batch_size):
            chunk = items[i : i + batch_size]
            out += self.ask(chunk, [prompt] * len(chunk), num_frames=num_frames, max_new_tokens=max_new_tokens, num_beams=num_beams)
        return out

    def answer(
        self,
        item,
        question: str,
        history: list[tuple[str, str]] | None = None,
        num_frames: int | None = None,
        max_new_tokens: int = MAX_NEW_TOKENS,
        **generate_kwargs,
    ) -> str:
        """Answer a question about one image or clip; `history` holds earlier (question, answer) turns."""
        return self.ask([item], [question], [history or []], num_frames, max_new_tokens, **generate_kwargs)[0]

    def ask(
        self, items, questions, histories=None, num_frames=None, max_new_tokens: int = MAX_NEW_TOKENS, num_beams: int = 1, **generate_kwargs
    ) -> list[str]:
        """Batched: one question (and history) per item. Items with different frame counts run separately.

        num_beams as in caption(); a caption-first bridge's own caption before the answer is decoded the same way."""
        from adapters.video import as_clip, decode_side  # PyAV loads only when items need decoding

        num_frames = num_frames or self.config.num_frames
        histories = histories or [[] for _ in items]
        side = decode_side(self.vision)  # the pixels `qformer recaption` and training decode
        pixels = [
            self.vision.preprocess(as_clip(it, num_frames=num_frames, sampling=self.config.frame_sampling, max_side=side).frames)
            for it in items
        ]  # (T, 3, H, W) each
        answers: list[str | None] = [None] * len(items)
        groups: dict[tuple, list[int]] = {}
        for i, px in enumerate(pixels):
            groups.setdefault(tuple(px.shape), []).append(i)
        for idx in groups.values():
            px = torch.stack([pixels[i] for i in idx])
            texts = self.answer_pixels(
                px, [questions[i] for i in idx], [histories[i] for i in idx], max_new_tokens, num_beams, **generate_kwargs
            )
            for i, text in zip(idx, texts):
                answers[i] = text
        return answers

    @torch.no_grad()
    def answer_pixels(
        self,
        pixel_values: torch.Tensor,
        questions,
        histories=None,
        max_new_tokens: int = MAX_NEW_TOKENS,
        num_beams: int = 1,
        rows=None,
        features: torch.Tensor | None = None,
        **generate_kwargs,
    ) -> list[str]:
        """One answer per question about already preprocessed pixels (B, T, 3, H, W) or (B, 3, H, W): question i
        is about row rows[i] (default: row i), so several questions may be about one clip.

        The vision encoder runs once per row whatever the number of questions about it, and so does the
        Q-Former unless it reads the question (an instructed bridge); only the LLM runs per question. For
        callers that decode and preprocess elsewhere (the recaptioner's worker processes). num_beams as in ask().
        features: the pixels' frame_features when the caller has them already (the recaptioner scores the
        answers on them too); pixel_values is then not read.
        """
        if num_beams < 1:
            raise ValueError(f"num_beams must be 1 (greedy) or more, not {num_beams}")
        histories = [list(h) for h in histories] if histories else [[] for _ in questions]
        rows = list(range(len(questions))) if rows is None else list(rows)
        if features is None:
            features = self.frame_features(pixel_values.to(self.projection.weight.device))  # (B, T, N, Dv)
        visual = None if self.config.instruct else self.visual_prompt(features=features)  # (B, Q, Dl)

        def about(picked: list[int]) -> dict[str, torch.Tensor]:
            """The frozen features, and the soft prompt when computed once, of the rows `picked` questions are about."""
            return dict(features=features[picked], visual=None if visual is None else visual[picked])

        if self.config.caption_first:
            # The chat opens with the bridge's own caption, as in training; decoded as the answer is, not streamed;
            # one caption per clip, whatever the number of questions about it.
            prompt = self.config.caption_prompt
            need = [i for i, (q, h) in enumerate(zip(questions, histories)) if self.captions_before(q, h)]
            clips = sorted({rows[i] for i in need})
            if clips:
                ids = self.generate(
                    **about(clips),
                    **self._prompt_batch([prompt] * len(clips), [[] for _ in clips]),
                    max_new_tokens=MAX_NEW_TOKENS,
                    num_beams=num_beams,
                )
                captions = dict(zip(clips, self.llm.tokenizer.batch_decode(ids, skip_special_tokens=True)))
                for i in need:
                    histories[i].insert(0, (prompt, captions[rows[i]].strip()))
        ids = self.generate(
            **about(rows), **self._prompt_batch(questions, histories), max_new_tokens=max_new_tokens, num_beams=num_beams, **generate_kwargs
        )
        return [text.strip() for text in self.llm.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def captions_before(self, question: str, history) -> bool:
        """Whether the bridge captions the clip before it answers `question` after `history`: a caption-first
        bridge does for every question but its caption prompt, unless the chat already opens with its caption."""
        prompt = self.config.caption_prompt
        return self.config.caption_first and question != prompt and not (history and history[0][0] == prompt)

    def _prompt_batch(self, questions, histories) -> dict[str, torch.Tensor]:
        """Left-padded chat prompts with the visual position of each row (and the Q-Former instruction)."""
        prompts = [self.llm.chat_prompt(q, h, self.config.system_prompt) for q, h in zip(questions, histories)]
        return self._left_padded([ids for ids, _ in prompts], [at for _, at in prompts], questions)

    def answer_batch(self, questions, answers, histories=None, max_answer_tokens: int | None = None) -> dict[str, torch.Tensor]:
        """A training batch: each chat prompt followed by its answer and the chat's end-of-turn token.

        Rows are left-padded so every answer ends at the last position (see forward's return_logits);
        labels are -100 everywhere but on the answer tokens and the end-of-turn token.
        """
        histories = histories or [[] for _ in questions]
        rows, positions, answer_starts = [], [], []
        for question, answer, history in zip(questions, answers, histories):
            prompt, at = self.llm.chat_prompt(question, history, self.config.system_prompt)
            rows.append(prompt + self._answer_ids(question, history, answer)[:max_answer_tokens])
            positions.append(at)
            answer_starts.append(len(prompt))
        return self._left_padded(rows, positions, questions, answer_starts)

    def _left_padded(self, rows, positions, questions, answer_starts=None) -> dict[str, torch.Tensor]:
        """Token rows left-padded to one length (so generation continues every row at the end), with
        each row's visual position shifted by its padding, labels from `answer_starts` on when given,
        and the questions tokenised for the Q-Former when the bridge is instructed."""
        device = self.projection.weight.device
        L = max(len(ids) for ids in rows)
        pads = [L - len(ids) for ids in rows]
        pad_id = self.llm.tokenizer.pad_token_id
        batch = dict(
            input_ids=torch.tensor([[pad_id] * p + ids for p, ids in zip(pads, rows)], device=device),
            attention_mask=torch.tensor([[0] * p + [1] * len(ids) for p, ids in zip(pads, rows)], device=device),
            visual_position=torch.tensor([p + at for p, at in zip(pads, positions)], device=device),
        )
        if answer_starts is not None:
            batch["labels"] = torch.tensor([[-100] * (p + n) + ids[n:] for p, n, ids in zip(pads, answer_starts, rows)], device=device)
        if self.config.instruct:
            enc = self.qformer_tokenizer(list(questions), padding=True, truncation=True, max_length=64, return_tensors="pt")
            batch.update(instruction_ids=enc["input_ids"].to(device), instruction_mask=enc["attention_mask"].to(device))
        return batch

    def _answer_ids(self, question: str, history, answer: str) -> list[int]:
        """Token ids of the assistant's turn as the LLM's own chat template writes it (answer + end of turn)."""
        tok = self.llm.tokenizer
        if getattr(tok, "chat_template", None) and not self.llm.verbatim:
            system = self.config.system_prompt
            messages = [] if system is None else [{"role": "system", "content": system}]
            for q, a in history or []:
                messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            messages.append({"role": "user", "content": question})
            prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            full = tok.apply_chat_template(messages + [{"role": "assistant", "content": answer}], tokenize=False)
            # Templates that rewrite earlier turns (e.g. dropping reasoning) break the prefix; then answer + eos.
            turn = full[len(prompt) :].rstrip() if full.startswith(prompt) else answer + (tok.eos_token or "")
            return tok(turn, add_special_tokens=False)["input_ids"]
        # No chat template (BLIP-2's OPT), or prompts taken verbatim: "Question: ... Answer:" continues with the
        # answer, then eos.
        ids = tok(" " + answer, add_special_tokens=False)["input_ids"]
        return ids + ([tok.eos_token_id] if tok.eos_token_id is not None else [])
