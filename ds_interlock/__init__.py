"""ds_interlock: interlocking backpropagation inside DeepSpeed's pipeline engine.

Names are imported on first use, so ``import ds_interlock`` (and the command-line tools
``python -m ds_interlock.replay`` and friends) do not pay for importing DeepSpeed.
"""
from importlib import import_module

_EXPORTS = {
    "InterlockingPipelineModule": ".module",
    "initialize": ".bootstrap",
    "InProcessPipeline": ".inprocess",
    "InterlockingConfig": ".config",
    "InterlockingConfigError": ".config",
    "Routing": ".routing",
}

__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ds_interlock' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
