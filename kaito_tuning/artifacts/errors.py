"""The errors of the artifacts stage: a user error (exit 65) or a transient one (exit 75), each with a reason."""

from __future__ import annotations

from kaito_tuning.errors import TransientError, UserError


class InvalidImageReference(UserError):
    reason = "InvalidImageReference"


class InvalidAuthFile(UserError):
    reason = "InvalidAuthFile"


class RegistryAuthFailed(UserError):
    """Wrong or missing credentials, or credentials without the needed permission: fix the secret."""

    reason = "RegistryAuthFailed"


class RegistryUnreachable(TransientError):
    reason = "RegistryUnreachable"


class RegistryError(TransientError):
    """The registry kept failing (5xx, 429) or answered something we cannot use."""

    reason = "RegistryError"

    def __init__(self, message: str, *, retry_after: float | None = None, **kw):
        super().__init__(message, **kw)
        self.retry_after = retry_after  #: seconds the registry asked us to wait (Retry-After), for retry.call


class RegistryRejected(UserError):
    """The registry refused the request for a reason the user must fix (4xx other than 401/403), or
    asked for something we will not do (send credentials over plain HTTP, downgrade to HTTP)."""

    reason = "RegistryRejected"


class ImageNotFound(UserError):
    reason = "ImageNotFound"


class ImageTooLarge(UserError):
    """A manifest, blob or unpacked layer is over its size budget (or the image has too many files)."""

    reason = "ImageTooLarge"


class AdapterIncomplete(UserError):
    reason = "AdapterIncomplete"


class NotAnAdapter(UserError):
    reason = "NotAnAdapter"


class NoDataInImage(UserError):
    reason = "NoDataInImage"


class UnsafeImage(UserError):
    """A layer would write outside the destination (path traversal, links) or holds sparse files: refused."""

    reason = "UnsafeImageContent"


class DestinationNotEmpty(UserError):
    reason = "DestinationNotEmpty"


class InvalidAnnotation(UserError):
    reason = "InvalidAnnotation"


class NoWeightsInImage(UserError):
    """A weights image or artifact that holds no model directory (config.json and weights)."""

    reason = "NoWeightsInImage"
