"""Shared fixtures live in one module per area, each owned by the tests of that area."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = ["fixtures_models", "fixtures_data", "fixtures_registry", "fixtures_k8s"]
