"""kaito-tuning: Kaito's Workspace.tuning API, rebuilt.

Pipeline stages, one module each:
spec (api, validation, config) -> manifests -> download -> dataset (format)
-> train -> oci (push) -> serve (attach).
"""

__version__ = "0.1.0"
