"""VQ image tokenizer (IBQ or VQ quantizer), the PatchGAN discriminator and LPIPS networks, and metrics. The
training losses built on them are in training/objectives.py."""

from modeling.tokenizer.config import TokenizerConfig, VQLossConfig
from modeling.tokenizer.discriminator import PatchDiscriminator
from modeling.tokenizer.perceptual import LPIPS
from modeling.tokenizer.quantizers import IBQuantizer, QuantizerOutput, VectorQuantizer
from modeling.tokenizer.tokenizer import TokenizerOutput, VQTokenizer

__all__ = [
    "LPIPS",
    "IBQuantizer",
    "PatchDiscriminator",
    "QuantizerOutput",
    "TokenizerConfig",
    "TokenizerOutput",
    "VQLossConfig",
    "VQTokenizer",
    "VectorQuantizer",
]
