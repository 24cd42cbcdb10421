"""Serving a preset model with adapters: adapter loading, the generation engine, the HTTP app.

What other stages (the demo) use is re-exported here, loaded on first use (torch is heavy).
"""

_EXPORTS = {"Generation", "load_engine", "parse_adapter_args", "quiet_libraries"}


def __getattr__(name):
    if name in _EXPORTS:
        from kaito_tuning.serving import serve

        return getattr(serve, "_quiet_libraries" if name == "quiet_libraries" else name)
    raise AttributeError(name)
