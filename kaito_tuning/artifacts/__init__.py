"""Adapters (and input data) as OCI images: references, registry auth, layers, safe unpack.

The registry protocol itself is oras-py's. What other stages use is re-exported here, so they do
not depend on how this package is split into modules.
"""

from kaito_tuning.artifacts.oci import (  # noqa: F401
    PullResult,
    PushResult,
    RegistryAuthFailed,
    pull_adapter,
    pull_data,
    push_adapter,
)
