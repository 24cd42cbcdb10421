"""Adapters (and input data) as OCI images, one module per job:

``reference`` (image references), ``auth`` (dockerconfigjson credentials), ``registry`` (the
protocol: oras-py, configured in one place), ``layers`` (adapter files, the reproducible layer, image
config, annotations), ``unpack`` (safe unpack with a budget), ``transfer`` (push and pull),
``cli`` (``kaito-tuning push`` / ``pull``), ``errors``.

What other stages use is re-exported here, so they do not depend on how this package is split.
"""

from kaito_tuning.artifacts.errors import RegistryAuthFailed
from kaito_tuning.artifacts.transfer import PullResult, PushResult, pull_adapter, pull_data, push_adapter

__all__ = ["PullResult", "PushResult", "RegistryAuthFailed", "pull_adapter", "pull_data", "push_adapter"]
