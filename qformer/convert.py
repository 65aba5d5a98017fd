"""Import weights into a Q-Former / bridge: transformers' BLIP-2, InstructBLIP and InstructBLIP-Video, and BERT checkpoints.

Each source is one key map from its names to ours (model.py), applied layer by layer, and a transformers
checkpoint's config one mapping to a BridgeConfig whose backbones are the checkpoint's own.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import torch

from adapters.checkpoint import CHECKPOINT_TYPES, CheckpointError, load_prefixed

from .config import BridgeConfig, QFormerConfig
from .model import QFormer

# transformers' BLIP-2 / InstructBLIP Q-Former (below "qformer.") -> ours. {i} is the layer index.
BLIP2_LAYER_MAP = {
    "attention.attention.query": "self_attn.query",
    "attention.attention.key": "self_attn.key",
    "attention.attention.value": "self_attn.value",
    "attention.output.dense": "self_attn.out",
    "attention.output.LayerNorm": "self_attn.norm",
    "crossattention.attention.query": "cross_attn.query",
    "crossattention.attention.key": "cross_attn.key",
    "crossattention.attention.value": "cross_attn.value",
    "crossattention.output.dense": "cross_attn.out",
    "crossattention.output.LayerNorm": "cross_attn.norm",
    "intermediate_query.dense": "mlp_query.fc_in",
    "output_query.dense": "mlp_query.fc_out",
    "output_query.LayerNorm": "mlp_query.norm",
    "intermediate.dense": "mlp_text.fc_in",
    "output.dense": "mlp_text.fc_out",
    "output.LayerNorm": "mlp_text.norm",
}
BLIP2_TOP_MAP = {
    "layernorm": "embeddings.norm",  # BLIP-2: the LayerNorm over the query embeddings
    "embeddings.layernorm": "embeddings.norm",  # InstructBLIP: over queries + instruction
    "embeddings.word_embeddings": "embeddings.word",
    "embeddings.position_embeddings": "embeddings.position",
}

# A BERT encoder (e.g. MiniLM) -> ours. The query feed-forward starts as a copy of the text one, as in BLIP-2.
BERT_LAYER_MAP = {
    "attention.self.query": ["self_attn.query"],
    "attention.self.key": ["self_attn.key"],
    "attention.self.value": ["self_attn.value"],
    "attention.output.dense": ["self_attn.out"],
    "attention.output.LayerNorm": ["self_attn.norm"],
    "intermediate.dense": ["mlp_text.fc_in", "mlp_query.fc_in"],
    "output.dense": ["mlp_text.fc_out", "mlp_query.fc_out"],
    "output.LayerNorm": ["mlp_text.norm", "mlp_query.norm"],
}

_LAYER = re.compile(r"^(?:encoder\.)?layer\.(\d+)\.(.+)\.(weight|bias)$")


def _rename(key: str, layer_map: dict, top_map: dict) -> list[str]:
    m = _LAYER.match(key)
    if m:
        i, name, kind = m.groups()
        targets = layer_map.get(name)
        targets = [targets] if isinstance(targets, str) else targets or []
        return [f"layers.{i}.{t}.{kind}" for t in targets]
    stem, _, kind = key.rpartition(".")
    return [f"{top_map[stem]}.{kind}"] if stem in top_map else []


def qformer_config_from_bert(bert, base: QFormerConfig | None = None) -> QFormerConfig:
    """`base` (default QFormerConfig()) with the architecture of a BERT-style config: a BERT, MiniLM, or the
    Q-Former config inside a BLIP-2 / InstructBLIP checkpoint, which are BERTs with cross-attention. The
    choices a BERT does not make (queries, cross-attention, tubelets, heads) stay base's."""
    return replace(
        base or QFormerConfig(),
        hidden_size=bert.hidden_size,
        num_layers=bert.num_hidden_layers,
        num_heads=bert.num_attention_heads,
        intermediate_size=bert.intermediate_size,
        vocab_size=bert.vocab_size,
        max_text_len=bert.max_position_embeddings,
        layer_norm_eps=bert.layer_norm_eps,
        dropout=bert.hidden_dropout_prob,
        hidden_act=bert.hidden_act,
        pad_token_id=bert.pad_token_id or 0,
    )


# Where transformers' InstructBLIP processors save the Q-Former's tokenizer, inside the checkpoint directory.
QFORMER_TOKENIZER_DIR = "qformer_tokenizer"


def checkpoint_bridge_config(path: str | Path) -> BridgeConfig:
    """The BridgeConfig of a transformers BLIP-2, InstructBLIP or InstructBLIP-Video checkpoint directory
    (save_pretrained of the model and its processor), validated: its backbones are the checkpoint's own.

    Prompts reach such a bridge's LLM verbatim (adapters.llm), so its caption prompt is empty: no text, as
    transformers captions. InstructBLIP's Q-Former reads the prompt too, in the tokenizer its processor
    saved beside the model. InstructBLIP-Video reads each of its 4 frames alone (QFormerConfig.frame_queries).
    A config that is not such a checkpoint's, or holds sizes beyond the bounds, is a CheckpointError.
    """
    from transformers import AutoConfig  # here: reading a bridge directory (search) never needs transformers' configs

    d = Path(path).absolute()
    try:
        config = AutoConfig.from_pretrained(str(d))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{d / 'config.json'}: not a readable transformers config ({e})") from None
    if config.model_type not in CHECKPOINT_TYPES:
        raise CheckpointError(
            f"{d / 'config.json'}: expected a BLIP-2, InstructBLIP or InstructBLIP-Video checkpoint "
            f"(model_type {', '.join(map(repr, CHECKPOINT_TYPES))}), found {config.model_type!r}"
        )
    instruct = config.model_type != "blip-2"
    video = config.model_type == "instructblipvideo"
    if instruct and not (d / QFORMER_TOKENIZER_DIR / "tokenizer_config.json").exists():
        raise CheckpointError(
            f"{d / QFORMER_TOKENIZER_DIR}: missing; an InstructBLIP checkpoint needs its Q-Former tokenizer, which "
            "its processor saves there (processor.save_pretrained(directory))"
        )
    q = config.qformer_config
    try:
        choices = QFormerConfig(
            num_queries=config.num_query_tokens,
            cross_attention_every=q.cross_attention_frequency,
            vision_width=q.encoder_hidden_size,
            vision_norm=False,  # transformers' BLIP-2 vision tower already ends in a LayerNorm
            frame_queries=video,
        )
        bridge = BridgeConfig(
            qformer=qformer_config_from_bert(q, choices),
            vision=str(d),
            llm=str(d),
            llm_width=config.text_config.hidden_size,
            instruct=instruct,
            qformer_tokenizer=str(d / QFORMER_TOKENIZER_DIR) if instruct else None,
            caption_prompt="",
            num_frames=4 if video else 1,  # InstructBLIP-Video's processor and generate take 4 frames
        )
        bridge.validate()
    except (TypeError, ValueError) as e:  # sizes beyond the bounds, values of the wrong type
        raise CheckpointError(f"{d / 'config.json'}: not a valid checkpoint config for a bridge: {e}") from None
    return bridge


def checkpoint_weights(path: str | Path, config: BridgeConfig) -> dict[str, torch.Tensor]:
    """The trainable weights ("qformer.*", "projection.*") of a transformers checkpoint in our names, for
    `config` (checkpoint_bridge_config's). Each weights file's header is checked before it is read.

    BLIP-2's Q-Former has no text side for generation (no word or position embeddings, no text
    feed-forward): those weights, never read without an instruction, and the temporal embedding (zero,
    which leaves frames as the checkpoint saw them) keep a fresh Q-Former's values."""
    source = load_prefixed(path, "qformer.")
    state = {}
    for key, value in source.items():
        for target in _rename(key, BLIP2_LAYER_MAP, BLIP2_TOP_MAP):
            state[target] = value
    state["query_tokens"] = load_prefixed(path, "query_tokens")[""]
    fresh = QFormer(config.qformer).state_dict()
    unused = ("temporal_embed",) if config.instruct else ("temporal_embed", "embeddings.word", "embeddings.position")
    missing = [k for k in fresh if k not in state and not k.startswith(unused) and (config.instruct or ".mlp_text." not in k)]
    if missing:
        raise CheckpointError(f"{path}: Q-Former weights missing from the checkpoint: {missing[:5]}")
    weights = {f"qformer.{k}": state.get(k, v) for k, v in fresh.items()}
    weights.update({f"projection.{k}": v for k, v in load_prefixed(path, "language_projection.").items()})
    return weights


def load_bert_into_qformer(qformer: QFormer, path: str) -> None:
    """Initialise from a BERT-style encoder directory (BLIP-2 starts from BERT; here e.g. MiniLM).

    Cross-attention stays randomly initialised. BERT adds token-type embedding 0 to every token; it
    is folded into the position embeddings, which is exact for single-segment text.
    """
    from transformers import AutoConfig

    cfg = qformer.config
    bert = AutoConfig.from_pretrained(path)
    mismatches = [
        f"{name} {theirs} != {ours}"
        for name, theirs, ours in [
            ("hidden size", bert.hidden_size, cfg.hidden_size),
            ("heads", bert.num_attention_heads, cfg.num_heads),
            ("intermediate size", bert.intermediate_size, cfg.intermediate_size),
            ("vocabulary", bert.vocab_size, cfg.vocab_size),
        ]
        if theirs != ours
    ]
    if bert.max_position_embeddings < cfg.max_text_len:
        mismatches.append(f"text positions {bert.max_position_embeddings} < {cfg.max_text_len}")
    if bert.num_hidden_layers < cfg.num_layers:
        mismatches.append(f"layers {bert.num_hidden_layers} < {cfg.num_layers}")
    if mismatches:
        raise ValueError(f"{path}: this BERT checkpoint does not fit the Q-Former config: {', '.join(mismatches)}")
    source = load_prefixed(path, "")
    source = {k.removeprefix("bert."): v for k, v in source.items()}
    state = {}
    for key, value in source.items():
        for target in _rename(key, BERT_LAYER_MAP, {}):
            if int(target.split(".")[1]) < cfg.num_layers:
                state[target] = value
    state["embeddings.word.weight"] = source["embeddings.word_embeddings.weight"]
    pos = source["embeddings.position_embeddings.weight"][: cfg.max_text_len]
    state["embeddings.position.weight"] = pos + source["embeddings.token_type_embeddings.weight"][0]
    state["embeddings.norm.weight"] = source["embeddings.LayerNorm.weight"]
    state["embeddings.norm.bias"] = source["embeddings.LayerNorm.bias"]
    missing, _ = qformer.load_state_dict(state, strict=False)
    expected_missing = ("cross_attn", "query_tokens", "temporal_embed", "vision_norm")
    left = [k for k in missing if not any(s in k for s in expected_missing)]
    if left:
        raise ValueError(f"{path}: weights missing from the BERT checkpoint: {left[:5]}")
