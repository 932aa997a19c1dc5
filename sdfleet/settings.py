"""Settings: one frozen object, built from the environment in one place (the CLI).

Environment variables are read only by :meth:`Settings.from_env`, never at import time. An unknown
``SDFLEET_*`` variable is an error with a near-miss hint, so a typo cannot silently fall back to a default.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from sdfleet.errors import ConfigError

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_OUT = "file://./outputs"
# One lock file per GPU UUID: local to the host (flock is not reliable on network file systems).
DEFAULT_GPU_LOCK_DIR = "/tmp/sdfleet-gpu-locks"

# Default webhook retry schedule, in seconds after the first failed attempt: about a day in all.
DEFAULT_WEBHOOK_SCHEDULE = (5, 30, 120, 600, 1800, 3600, 7200, 14400, 28800, 28800)


class Settings(BaseModel):
    """Settings shared by every role (producer, worker, scheduler, webhook sender)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    redis_url: str = DEFAULT_REDIS_URL
    out: str = DEFAULT_OUT
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    # Longer than the longest batch: an unacked message is redelivered after this many seconds.
    visibility_timeout: int = Field(7200, ge=60)
    # A job whose processing has been started this many times without finishing is failed (poison pill).
    max_job_crashes: int = Field(3, ge=1, le=100)
    heartbeat_interval: float = Field(2.0, gt=0)
    heartbeat_ttl: float = Field(10.0, gt=0)
    webhook_secret: str | None = Field(None, repr=False)
    webhook_allow_private: bool = False
    webhook_timeout: float = Field(15.0, gt=0)
    webhook_schedule: tuple[float, ...] = DEFAULT_WEBHOOK_SCHEDULE
    log_format: str = "auto"
    log_level: str = "info"
    upload_retries: int = Field(8, ge=0)
    # Where workers on one host take their per-GPU locks; every worker of the host must use the same one.
    gpu_lock_dir: str = DEFAULT_GPU_LOCK_DIR

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, v: str) -> str:
        if not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix:// (e.g. redis://127.0.0.1:6379/0)")
        return v

    @field_validator("log_format")
    @classmethod
    def _log_format(cls, v: str) -> str:
        if v not in ("auto", "json", "console"):
            raise ValueError("must be auto, json or console")
        return v

    @field_validator("webhook_secret")
    @classmethod
    def _secret(cls, v: str | None) -> str | None:
        # Several secrets (space- or comma-separated) are active during a rotation; each must look right.
        if v is not None and not all(s.startswith("whsec_") for s in v.replace(",", " ").split() or [""]):
            raise ValueError("must look like whsec_<base64> (several: space- or comma-separated); "
                             "generate one with 'sdfleet webhooks new-secret'")
        return v

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from ``REDIS_URL`` and ``SDFLEET_*`` variables, then explicit overrides."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        if env.get("REDIS_URL"):
            values["redis_url"] = env["REDIS_URL"]
        known = {name.upper(): name for name in cls.model_fields}
        for key, raw in env.items():
            if not key.startswith("SDFLEET_"):
                continue
            name = key[len("SDFLEET_"):]
            if name in _NOT_SETTINGS:
                continue
            if name not in known:
                close = difflib.get_close_matches(name, list(known), n=1)
                hint = f"; did you mean SDFLEET_{close[0]}?" if close else ""
                raise ConfigError(f"unknown setting {key}{hint} (known: {', '.join('SDFLEET_' + k for k in sorted(known))})")
            field = known[name]
            if field == "webhook_schedule":
                try:
                    values[field] = tuple(float(x) for x in raw.split(",") if x.strip())
                except ValueError:
                    raise ConfigError(f"{key}={raw!r}: expected comma-separated seconds, e.g. 5,30,120") from None
            elif field == "webhook_allow_private":
                values[field] = raw.strip().lower() in ("1", "true", "yes", "on")
            else:
                values[field] = raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**values)
        except ValidationError as exc:
            err = exc.errors()[0]
            field = str(err["loc"][0]) if err["loc"] else "?"
            env_name = "REDIS_URL" if field == "redis_url" else f"SDFLEET_{field.upper()}"
            raise ConfigError(f"setting {env_name}: {err['msg']}") from None


# SDFLEET_* variables that belong to tools around sdfleet, not to Settings.
_NOT_SETTINGS = frozenset({"HOME", "TEST_REDIS_URL", "CACHE_DIR"})
