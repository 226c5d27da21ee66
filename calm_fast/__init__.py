"""calm_fast: CALM (Composition to Augment Language Models) with fused kernels."""
from . import ops
from .composed import CALM, default_mapping
from .config import CompositionConfig, DecoderConfig
from .decoder import Decoder
from .generate import generate, stream

__all__ = ["CALM", "CompositionConfig", "Decoder", "DecoderConfig", "default_mapping", "generate",
           "ops", "stream"]
__version__ = "0.1.0"
