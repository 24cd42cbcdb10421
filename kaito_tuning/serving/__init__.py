"""Serving a preset model with adapters: ``adapters`` (which, checked), ``engine`` (generation),
``app`` (the FastAPI app), ``cli`` (``kaito-tuning chat`` and ``serve``).

What other stages (the demo) use is re-exported here, loaded on first use (torch is heavy).
"""

_EXPORTS = {
    "Generation": "kaito_tuning.serving.engine",
    "load_engine": "kaito_tuning.serving.engine",
    "quiet_libraries": "kaito_tuning.serving.engine",
    "parse_adapter_args": "kaito_tuning.serving.adapters",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
