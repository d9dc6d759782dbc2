"""VQ image tokenizer (IBQ or VQ quantizer), its training objective, discriminator, metrics and weight EMA."""

from modeling.tokenizer.config import TokenizerConfig, VQLossConfig
from modeling.tokenizer.discriminator import PatchDiscriminator
from modeling.tokenizer.ema import ModelEMA
from modeling.tokenizer.losses import VQLoss
from modeling.tokenizer.perceptual import LPIPS
from modeling.tokenizer.quantizers import IBQuantizer, QuantizerOutput, VectorQuantizer
from modeling.tokenizer.tokenizer import TokenizerOutput, VQTokenizer

__all__ = [
    "LPIPS",
    "IBQuantizer",
    "ModelEMA",
    "PatchDiscriminator",
    "QuantizerOutput",
    "TokenizerConfig",
    "TokenizerOutput",
    "VQLoss",
    "VQLossConfig",
    "VQTokenizer",
    "VectorQuantizer",
]
