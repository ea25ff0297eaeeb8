"""One exception hierarchy. The CLI maps it to exit codes (`exit_code`); the service maps the
classes to HTTP statuses in one table of its own (`fewstep.server.errors`). Library code raises,
never prints or exits."""

from __future__ import annotations


class FewstepError(Exception):
    """Base class. `field` names the request field or option at fault, when there is one."""

    kind = "error"
    exit_code = 1

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field

    def to_dict(self) -> dict:
        return {"type": self.kind, "message": self.message, "field": self.field}


class InvalidRequest(FewstepError):
    """A value the user gave is out of range, malformed or inconsistent."""

    kind = "invalid_request"
    exit_code = 2


class NotFound(FewstepError):
    """A model, LoRA or component name or path that does not exist."""

    kind = "not_found"
    exit_code = 2


class UnsafeFormat(InvalidRequest):
    """Pickle-based weights (.ckpt/.pt/.bin/.pth): refused, never loaded."""

    kind = "unsafe_format"


class ModelError(FewstepError):
    """A model or component that cannot be loaded or does not fit the others."""

    kind = "model_error"
    exit_code = 3


class LoraError(ModelError):
    """A LoRA file that is broken or does not fit the model."""

    kind = "lora_error"


class OfflineError(ModelError):
    """A hub reference that is not in the local cache while offline or unreachable."""

    kind = "offline"


class Cancelled(FewstepError):
    kind = "cancelled"
    exit_code = 130


class OutOfMemory(FewstepError):
    kind = "out_of_memory"
    exit_code = 4
