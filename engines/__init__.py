"""Test-time adaptation engines, pure PyTorch: `get_engine("ttt" | "it3")`.

Registration is explicit: each engine module is imported here, and its `@register_engine`
decorator adds it to the registry.
"""

from engines.base import (AdaptResult, Engine, config_from_dict, get_engine, list_engines,
                          register_engine)
from engines.config import EngineConfig, IT3Config, TTTConfig
from engines.hooks import find_module, layer_names
from engines.it3 import IT3Engine
from engines.ttt import TTTEngine, rotate_batch

__all__ = [
    "AdaptResult",
    "Engine",
    "EngineConfig",
    "IT3Config",
    "IT3Engine",
    "TTTConfig",
    "TTTEngine",
    "config_from_dict",
    "find_module",
    "get_engine",
    "layer_names",
    "list_engines",
    "register_engine",
    "rotate_batch",
]
