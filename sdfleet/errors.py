"""The one exception tree of sdfleet.

Every message names what is wrong and how to fix it; the CLI maps each class to an exit code.
"""

from __future__ import annotations


class SdfleetError(Exception):
    """Base of every error sdfleet raises on purpose."""

    exit_code = 1


class ConfigError(SdfleetError):
    """A setting (environment variable or flag) is unknown or malformed."""

    exit_code = 2


class InvalidJob(SdfleetError):
    """One job fails validation. ``field`` names the offending field, ``line`` the input line (1-based)."""

    exit_code = 2

    def __init__(self, message: str, *, field: str | None = None, line: int | None = None):
        self.field = field
        self.line = line
        self.reason = message
        where = []
        if line is not None:
            where.append(f"line {line}")
        if field is not None:
            where.append(f"field '{field}'")
        prefix = (", ".join(where) + ": ") if where else ""
        super().__init__(prefix + message)


class InvalidFile(SdfleetError):
    """An input file has invalid lines; nothing from it was enqueued."""

    exit_code = 2

    def __init__(self, path: str, errors: list[InvalidJob], *, shown: int = 20):
        self.path = path
        self.errors = errors
        lines = [f"{path}: {len(errors)} invalid line(s); nothing was enqueued."]
        lines += [f"  {e}" for e in errors[:shown]]
        if len(errors) > shown:
            lines.append(f"  ... and {len(errors) - shown} more")
        lines.append("Fix the lines above, or pass --skip-invalid to submit only the valid ones.")
        super().__init__("\n".join(lines))


class BatchNotFound(SdfleetError):
    exit_code = 2

    def __init__(self, batch_id: str):
        self.batch_id = batch_id
        super().__init__(f"no batch '{batch_id}' in this Redis; check the id printed by 'sdfleet submit' and REDIS_URL")


class StorageError(SdfleetError):
    """Storing or reading an object failed (after retries where they apply).

    ``permanent``: the error cannot clear by waiting (no such bucket, access denied, not a directory), so a
    job meeting it is failed after a few tries instead of waiting for the store to come back.
    """

    def __init__(self, message: str, *, permanent: bool = False):
        super().__init__(message)
        self.permanent = permanent


class BrokerUnavailable(SdfleetError):
    """Redis did not answer."""


class EngineError(SdfleetError):
    """The image engine failed for a reason that is not the job's fault."""


class PrecisionUnsupported(EngineError):
    """The requested precision cannot run on this device (e.g. fp8 below compute capability 8.9)."""

    exit_code = 2


class GraphCaptureError(EngineError):
    """A CUDA graph could not be captured (an operation that cannot be recorded): that shape runs eagerly."""


class MalformedMessage(SdfleetError):
    """A queue message that is not a valid sdfleet job (corrupt, forged or from another producer)."""


class WebhookError(SdfleetError):
    """A webhook URL or delivery is not acceptable."""


class LeaseLost(SdfleetError):
    """A submission's lease expired (or another producer took it) before its commit: nothing was recorded."""

    def __init__(self, batch_id: str):
        self.batch_id = batch_id
        super().__init__(f"batch '{batch_id}': the submission lease expired before the commit, so nothing was "
                         "recorded and none of its jobs will run; submit again")
