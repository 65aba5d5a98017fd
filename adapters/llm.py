"""Frozen language models, decoder-only or encoder-decoder, behind one small protocol.

width: int                               embedding width
tokenizer                                the model's own, with its chat template when it has one
is_encoder_decoder: bool                 T5-style: the sequence is the encoder's input, text comes from the decoder
embed(input_ids) -> (B, L, D)
forward(inputs_embeds, attention_mask) -> logits (B, S, V); an encoder-decoder's are its decoder's (B, K, V)
lm_loss(inputs_embeds, attention_mask, labels) -> (logits, loss) of the labelled positions of the sequence
generate(inputs_embeds, attention_mask, max_new_tokens, ...) -> new token ids (B, K)
chat_prompt(question, history) -> (token ids, index where the visual prompt goes)

A sequence is the same for both kinds: the prompt with the visual prompt spliced in, then (in training)
the answer, labelled. A decoder-only model predicts each labelled token from the one before; an
encoder-decoder reads the unlabelled part and its decoder writes the labelled part (BLIP-2's prefix-LM).
"""

from __future__ import annotations

import hashlib
import inspect
import os
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import CHECKPOINT_TYPES, load_prefixed
from .offline import cache_dir, gguf_path
from .vision import FrozenModule

# Built-in offline LLMs: real pretrained weights shipped inside packages as GGUF files.
OFFLINE_LLMS = ("smollm2-135m-instruct", "gemma3-270m")

# Stands for the visual prompt while the chat template is rendered as text; split out afterwards.
VISUAL_MARK = "<<visual-prompt>>"


class LanguageModel(FrozenModule):
    """verbatim: prompts reach the model as written, tokenised as transformers' BLIP-2 and InstructBLIP
    processors do (no chat template, no "Question: ... Answer:" around them): for the language models of
    those checkpoints, whose users write the whole prompt."""

    def __init__(self, model: nn.Module, tokenizer, name: str, lora=None, verbatim: bool = False):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.verbatim = verbatim
        self.is_encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
        self.freeze()
        if lora is not None:
            import peft

            self.model = peft.get_peft_model(
                model,
                peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules),
            )
        self.width = self.model.get_input_embeddings().embedding_dim
        self._takes_position_ids = "position_ids" in inspect.signature(self.model.forward).parameters
        base = self.model.get_base_model() if lora is not None else self.model
        self._takes_logits_to_keep = "logits_to_keep" in inspect.signature(base.forward).parameters
        if tokenizer is not None and tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    def lay_out_for_decoding(self) -> LanguageModel:
        """Store the weights of the frozen model's float32 Linear layers (and so of any embedding tied to one)
        column-major on a CPU: the same values and shapes, the transpose contiguous. Returns self.

        Decoding multiplies a few rows (the batch) by every weight, once per token. MKL's sgemm does that
        about 2.3x faster from a column-major weight (8 rows by a 2048x512 weight: 205 us against 484 us on
        one thread, 97 against 135 on two; python -m bench.decoding), and each row then comes out with the
        same bits whatever the number of rows from 2 to 64. From 64 rows on (prefill, training) the two
        layouts run alike. The parameters stay the same objects, so tied weights stay tied; trainable ones
        (LoRA) are left alone, since they are saved."""
        for module in self.model.modules():
            w = getattr(module, "weight", None) if isinstance(module, nn.Linear) else None
            if w is not None and w.device.type == "cpu" and w.dtype == torch.float32 and not w.requires_grad and w.is_contiguous():
                w.data = w.data.t().contiguous().t()
        return self

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(input_ids)

    def forward(self, inputs_embeds, attention_mask, logits_to_keep: int = 0, decoder_targets=None, **kwargs):
        """Vocabulary logits (B, S, V), or of the last `logits_to_keep` positions only (B, keep, V).

        Encoder-decoder: the logits of the decoder (B, K, V) reading the sequence, teacher-forced on
        `decoder_targets` (B, K; -100 = padding); without them, those of its first step (B, 1, V)."""
        inputs_embeds = inputs_embeds.to(self.dtype)
        if self.is_encoder_decoder:
            if decoder_targets is None:
                decoder_targets = attention_mask.new_full((attention_mask.shape[0], 1), -100)
            # Given labels, the model shifts them right behind its decoder start token, as in its training.
            return self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=decoder_targets, **kwargs).logits
        if self._takes_position_ids and "position_ids" not in kwargs:
            # Positions count real tokens only, so left-padded rows match what generate() computes.
            kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        if logits_to_keep and self._takes_logits_to_keep:
            kwargs["logits_to_keep"] = logits_to_keep  # the LM head then runs on those positions alone
        logits = self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs).logits
        return logits[:, -logits_to_keep:] if logits_to_keep else logits

    def lm_loss(self, inputs_embeds, attention_mask, labels, return_logits: bool = True):
        """(logits or None, loss): the language-model loss of the labelled tokens of the sequence (labels
        (B, S), -100 where nothing is predicted) and the logits forward() gives, when asked for.

        Decoder-only: each labelled token is predicted from the position before it. Without return_logits
        the vocabulary projection runs only from the first such position on: on a CPU that projection is the
        largest single cost of a training step. Encoder-decoder (BLIP-2's prefix-LM): the unlabelled
        positions are the encoder's input and the labelled tokens, in order, the decoder's targets."""
        if self.is_encoder_decoder:
            targets = decoder_targets(labels)  # (B, K)
            logits = self(inputs_embeds, attention_mask * (labels == -100), decoder_targets=targets)  # (B, K, V)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
            return (logits if return_logits else None), loss
        if return_logits:
            logits = self(inputs_embeds, attention_mask)  # (B, S, V)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
            return logits, loss
        S = inputs_embeds.shape[1]
        rows, cols = (labels[:, 1:] != -100).nonzero(as_tuple=True)  # cols: positions whose logits the loss reads
        keep = S - int(cols.min()) if len(cols) else 1
        logits = self(inputs_embeds, attention_mask, logits_to_keep=keep)  # (B, keep, V)
        return None, F.cross_entropy(logits[rows, cols - (S - keep)].float(), labels[rows, cols + 1])

    @torch.no_grad()
    def generate(self, inputs_embeds, attention_mask, max_new_tokens: int, **kwargs) -> torch.Tensor:
        kwargs.setdefault("do_sample", False)
        kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id if self.tokenizer is not None else None)
        # Given embeddings and no ids, transformers returns only the new tokens; an encoder-decoder's
        # output starts with its decoder start token, which is no token of the answer.
        ids = self.model.generate(
            inputs_embeds=inputs_embeds.to(self.dtype), attention_mask=attention_mask, max_new_tokens=max_new_tokens, **kwargs
        )
        return ids[:, 1:] if self.is_encoder_decoder else ids

    def chat_prompt(self, question: str, history: list[tuple[str, str]] | None = None, system: str | None = None) -> tuple[list[int], int]:
        """Token ids of a chat turn with the visual prompt in the first user message, and where it goes
        (a verbatim model: the prompt as written, the visual prompt before it).

        system: a system message (None: whatever the template does without one; SmolLM2's adds its own).
        """
        tok = self.tokenizer
        if tok is None:
            raise ValueError(f"{self.name}: this language model has no tokenizer; pass input_ids yourself")
        history = history or []
        if self.verbatim:
            # As the checkpoint's processor tokenises the prompt; earlier turns go before it as written,
            # each followed by its answer (BLIP-2's "Question: ... Answer: ..." chats).
            turns = ([system] if system else []) + [f"{q} {a}" for q, a in history] + [question]
            return tok(" ".join(t for t in turns if t))["input_ids"], 0
        if getattr(tok, "chat_template", None):
            messages = [] if system is None else [{"role": "system", "content": system}]
            for i, (q, a) in enumerate(history):
                messages += [{"role": "user", "content": (VISUAL_MARK if i == 0 else "") + q}, {"role": "assistant", "content": a}]
            messages.append({"role": "user", "content": ("" if history else VISUAL_MARK) + question})
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            before, after = text.split(VISUAL_MARK, 1)
            ids_before = tok(before, add_special_tokens=False)["input_ids"]
            return ids_before + tok(after, add_special_tokens=False)["input_ids"], len(ids_before)
        # No chat template (BLIP-2's OPT, or a base model such as the offline Gemma-3-270M, which was never
        # taught the turn tokens): visual prompt first, then BLIP-2's question format.
        turns = ([system] if system else []) + [f"Question: {q} Answer: {a}" for q, a in history]
        if question:
            turns.append(f"Question: {question} Answer:")
        return tok(" ".join(turns))["input_ids"], 0


def load_llm(
    spec: str,
    lora=None,
    dtype: torch.dtype = torch.float32,
    quantization_config=None,
    trust_remote_code: bool = False,
) -> LanguageModel:
    """A frozen LM from a built-in offline name, a .gguf file, a local directory or a hub id: a causal LM,
    or an encoder-decoder (T5, Flan-T5) by its config.

    GGUF files are dequantised once and cached as safetensors. A BLIP-2 or InstructBLIP (-Video) checkpoint
    directory gives its language model, decoder-only or encoder-decoder, which takes prompts verbatim.
    """
    import transformers

    if spec in OFFLINE_LLMS or spec.endswith(".gguf"):
        path = _gguf_as_safetensors(spec)
        name = spec
    else:
        path, name = spec, spec
    config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if config.model_type in CHECKPOINT_TYPES:
        return _llm_from_checkpoint(path, config, lora, dtype)
    kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code)
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    auto = transformers.AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else transformers.AutoModelForCausalLM
    model = auto.from_pretrained(path, **kwargs)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    return LanguageModel(model, tokenizer, name, lora)


def _llm_from_checkpoint(path: str, config, lora, dtype) -> LanguageModel:
    import transformers

    text_config = config.text_config
    encoder_decoder = getattr(text_config, "is_encoder_decoder", False)
    auto = transformers.AutoModelForSeq2SeqLM if encoder_decoder else transformers.AutoModelForCausalLM
    model = auto.from_config(text_config)
    state = load_prefixed(path, "language_model.")
    missing, _ = model.load_state_dict(state, strict=False)
    model.tie_weights()
    # Tied weights (an output head sharing the input embeddings, T5's encoder and decoder embeddings
    # sharing `shared`) are saved once; any other weight missing is a damaged checkpoint.
    loaded = {p.data_ptr() for n, p in model.named_parameters(remove_duplicate=False) if n in state}
    missing = [k for k in missing if model.get_parameter(k).data_ptr() not in loaded]
    if missing:
        raise ValueError(f"{path}: language model weights missing from the checkpoint: {missing[:5]}")
    model.to(dtype)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError):
        tokenizer = None
    return LanguageModel(model, tokenizer, path, lora, verbatim=True)


def decoder_targets(labels: torch.Tensor) -> torch.Tensor:
    """(B, K): each row's labelled tokens (labels (B, S), -100 elsewhere) in order, padded with -100 to the
    longest row's count: what an encoder-decoder's decoder writes."""
    keep = labels != -100
    rows, cols = keep.nonzero(as_tuple=True)
    targets = labels.new_full((labels.shape[0], int(keep.sum(1).max()) if len(rows) else 0), -100)
    targets[rows, (keep.cumsum(1) - 1)[rows, cols]] = labels[rows, cols]
    return targets


def _gguf_as_safetensors(spec: str) -> str:
    """Dequantise a GGUF file once into a transformers directory (safetensors) in the cache."""
    src = gguf_path(spec) if spec in OFFLINE_LLMS else Path(spec)
    if not src.is_file():
        raise FileNotFoundError(f"{spec}: no such GGUF file")
    st = src.stat()
    key = hashlib.sha1(f"{src.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "llm" / f"{src.stem}-{key}"
    if (target / "config.json").exists():
        return str(target)
    import transformers

    tmp = target.parent / f"{target.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    # transformers refuses to save a model it marked as GGUF-quantised; the tensors are plain fp32 by now.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, target)  # atomic: another process may have won the race, then keep its copy
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)
