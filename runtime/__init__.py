"""The engine: continuous batching over a paged KV cache with a radix prefix cache, hot weight updates.

`from runtime import Engine` is the in-process API (runtime/engine.py). The names below load on first
use, so `import runtime.x` stays light (no transformers / model code until an Engine is wanted).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from runtime.engine import Engine, WeightsUnusableError
    from runtime.server_args import ServerArgs

_EXPORTS = {
    "Engine": "runtime.engine",
    "WeightsUnusableError": "runtime.engine",
    "ServerArgs": "runtime.server_args",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'runtime' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
