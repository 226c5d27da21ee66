"""calm_fast: CALM (Composition to Augment Language Models) with fused kernels."""
from . import ops
from .composed import CALM, default_mapping
from .config import CompositionConfig, DecoderConfig
from .decoder import Decoder
from .onnx_export import export_onnx
from .generate import generate, stream
from .hf import load_hf

__all__ = ["CALM", "CompositionConfig", "Decoder", "DecoderConfig", "default_mapping", "export_onnx",
           "generate", "load_hf", "ops", "stream"]
__version__ = "0.1.0"
