"""Adapters (and input data) as OCI images, one module per job:

``reference`` (image references), ``auth`` (dockerconfigjson credentials), ``registry`` (the
protocol: oras-py, configured in one place), ``layers`` (adapter files, the reproducible layer, image
config, annotations), ``unpack`` (safe unpack with a budget), ``transfer`` (push and pull),
``weights`` (base-model weights from an artifact or a model image, into the weights cache), ``cli`` (``kaito-tuning push`` / ``pull``), ``errors``.

What other stages use is re-exported here, so they do not depend on how this package is split.
"""

from kaito_tuning.artifacts.errors import NoWeightsInImage, RegistryAuthFailed
from kaito_tuning.artifacts.transfer import PullResult, PushResult, pull_adapter, pull_data, push_adapter
from kaito_tuning.artifacts.weights import WeightsPull, cached_weights, pull_weights, push_weights

__all__ = ["NoWeightsInImage", "PullResult", "PushResult", "RegistryAuthFailed", "WeightsPull", "cached_weights",
           "pull_adapter", "pull_data", "pull_weights", "push_adapter", "push_weights"]
