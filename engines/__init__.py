"""Test-time adaptation engines, pure PyTorch: `get_engine(name)` for name in `list_engines()` —
"ttt", "it3" (joint training with an auxiliary part), the fully test-time methods "norm",
"tent", "eata", "sar", "memo", "cotta", "lame" and the unadapted "source" (any source model;
`needs_joint_training` False).

Registration is explicit: each engine module is imported here, and its `@register_engine`
decorator adds it to the registry.
"""

from engines.base import (AdaptResult, Engine, config_from_dict, entropy_gate, get_engine, list_engines,
                          register_engine)
from engines.config import EngineConfig, IT3Config, TTAConfig, TTTConfig
from engines.cotta import CoTTAConfig, CoTTAEngine
from engines.eata import EATAConfig, EATAEngine
from engines.hooks import find_module, layer_names
from engines.it3 import IT3Engine
from engines.lame import LAMEConfig, LAMEEngine
from engines.memo import MEMOConfig, MEMOEngine
from engines.norm import NormConfig, NormEngine
from engines.sar import SARConfig, SAREngine
from engines.source import SourceConfig, SourceEngine
from engines.tent import TentConfig, TentEngine
from engines.tta import TTAEngine, batch_statistics, softmax_entropy
from engines.ttt import TTTEngine, rotate_batch

__all__ = [
    "AdaptResult",
    "CoTTAConfig",
    "CoTTAEngine",
    "EATAConfig",
    "EATAEngine",
    "Engine",
    "EngineConfig",
    "IT3Config",
    "IT3Engine",
    "LAMEConfig",
    "LAMEEngine",
    "MEMOConfig",
    "MEMOEngine",
    "NormConfig",
    "NormEngine",
    "SARConfig",
    "SAREngine",
    "SourceConfig",
    "SourceEngine",
    "TTAConfig",
    "TTAEngine",
    "TTTConfig",
    "TTTEngine",
    "TentConfig",
    "TentEngine",
    "batch_statistics",
    "config_from_dict",
    "entropy_gate",
    "find_module",
    "get_engine",
    "layer_names",
    "list_engines",
    "register_engine",
    "rotate_batch",
    "softmax_entropy",
]
