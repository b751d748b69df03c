"""dualmoe: DualPipe/DualPipeV pipeline schedules and EPLB-balanced MoE for DeepSpeed."""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# The public API is imported lazily so that `import dualmoe` (and the pure plan layer) does not pull
# in torch.distributed or deepspeed.
_LAZY = {
    "initialize": "dualmoe.api",
    "install": "dualmoe.api",
    "uninstall": "dualmoe.api",
    "prepare": "dualmoe.api",
    "add_arguments": "dualmoe.api",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dualmoe' has no attribute {name!r}")
