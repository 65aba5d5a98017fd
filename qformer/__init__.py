"""A trainable Q-Former bridge between a frozen vision encoder and a frozen causal LLM."""

from .bridge import Bridge, BridgeOutput
from .config import BridgeConfig, LoraConfig, QFormerConfig
from .model import QFormer

__all__ = ["Bridge", "BridgeOutput", "BridgeConfig", "LoraConfig", "QFormerConfig", "QFormer"]
