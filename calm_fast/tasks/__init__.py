"""Tasks: the paper's key-value arithmetic experiment."""
from .kv_arith import KVArith, TaskConfig, Tokenizer

__all__ = ["KVArith", "TaskConfig", "Tokenizer"]
