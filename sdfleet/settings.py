"""Settings: one frozen object, built from the environment in one place (the CLI).

Environment variables are read only by :meth:`Settings.from_env`, never at import time. An unknown
``SDFLEET_*`` variable is an error with a near-miss hint, so a typo cannot silently fall back to a default.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from sdfleet.errors import ConfigError

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_OUT = "file://./outputs"
# One lock file per GPU UUID: local to the host (flock is not reliable on network file systems).
DEFAULT_GPU_LOCK_DIR = "/tmp/sdfleet-gpu-locks"

# Query options a REDIS_URL may carry (TLS material for rediss://); anything else is a typo.
REDIS_URL_OPTIONS = frozenset({"ssl_cert_reqs", "ssl_ca_certs", "ssl_ca_path", "ssl_certfile", "ssl_keyfile",
                               "ssl_check_hostname"})
# The options whose values are words: anything else fails later, in redis-py or kombu, with their message.
_REDIS_OPTION_VALUES = {"ssl_cert_reqs": ("none", "optional", "required"), "ssl_check_hostname": ("true", "false")}
_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\]")
# A producer holds its submission lease this long without renewing it; a killed one blocks the batch no longer.
DEFAULT_SUBMISSION_LEASE_S = 30.0
# Deliveries to one receiver host in flight at once per webhook worker: a hanging receiver takes no more.
DEFAULT_WEBHOOK_PER_HOST = 2


def parse_redis_url(url: str) -> str:
    """Check ``url`` strictly and return it: redis:// or rediss://, a host, a port, a numeric database.

    redis-py and kombu each parse the URL their own way (redis-py ignores a database it cannot read, kombu
    refuses it), so anything either could read differently is refused here. Raises ValueError with the fix.
    """
    example = "e.g. redis://127.0.0.1:6379/0 or rediss://user:password@host:6380/0"
    if not url:
        raise ValueError(f"is empty; {example}")
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        raise ValueError(f"contains whitespace or control characters; {example}")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"is malformed ({exc}); {example}") from None
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"scheme {parts.scheme or '(none)'!r} is not redis or rediss; {example}")
    host = parts.netloc.rsplit("@", 1)[-1]
    host = host[:host.rindex(":")] if host.count(":") == 1 or host.endswith(f"]:{port}") else host
    if not host or not _HOST.fullmatch(host):
        raise ValueError(f"has no valid host ({host or 'none'}); {example}")
    if port is None or not 1 <= port <= 65535:
        raise ValueError(f"has no port; write it out, {example}")
    db = parts.path[1:] if parts.path.startswith("/") else parts.path
    if not re.fullmatch(r"[0-9]{1,5}", db):
        raise ValueError(f"database {unquote(db) or '(none)'!r} is not a number; {example}")
    if parts.fragment:
        raise ValueError(f"has a fragment ('#...'); {example}")
    options = parse_qsl(parts.query, keep_blank_values=True)
    for name, value in options:
        if name not in REDIS_URL_OPTIONS:
            raise ValueError(f"unknown option {name!r} (known: {', '.join(sorted(REDIS_URL_OPTIONS))})")
        if parts.scheme == "redis":
            # redis-py would fail later with a TypeError: TLS material means nothing to a plain connection.
            raise ValueError(f"option {name!r} is a TLS option, but the scheme is redis://; use rediss:// for TLS, "
                             "or drop the option")
        allowed = _REDIS_OPTION_VALUES.get(name)
        if allowed and value.lower() not in allowed:
            raise ValueError(f"option {name}={value[:40]!r} is not one of {', '.join(allowed)}")
    if parts.scheme == "rediss" and "ssl_cert_reqs" not in dict(options):
        # Said out loud so both clients verify: redis-py would use the system CA store, but kombu turns a
        # rediss:// URL without TLS options into an unverified connection.
        url += ("&" if parts.query else "?") + "ssl_cert_reqs=required"
    return url


def redis_address(url: str) -> str:
    """host:port/db of a REDIS_URL, without credentials (for messages)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rsplit('@', 1)[-1]}{parts.path}"


# Default webhook retry schedule, in seconds after the first failed attempt: about a day in all.
DEFAULT_WEBHOOK_SCHEDULE = (5, 30, 120, 600, 1800, 3600, 7200, 14400, 28800, 28800)
DEFAULT_RECORD_TTL_S = 30 * 24 * 3600  # as keys.RECORD_TTL_S: what a user may come back for
DEFAULT_PARTIAL_FILE_GRACE_S = 3600.0  # far longer than any write of one image takes
DEFAULT_TARGET_DRAIN_S = 300.0
DEFAULT_SCALE_COOLDOWN_S = 300.0


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
    # Secrets a rotation replaced: deliveries are signed with these too (one signature each) until the operator
    # removes them, so receivers can switch at their own pace within the window.
    webhook_previous_secrets: str | None = Field(None, repr=False)
    webhook_per_host: int = Field(DEFAULT_WEBHOOK_PER_HOST, ge=1, le=256)
    submission_lease_s: float = Field(DEFAULT_SUBMISSION_LEASE_S, ge=1, le=3600)
    webhook_allow_private: bool = False
    webhook_timeout: float = Field(15.0, gt=0)
    webhook_schedule: tuple[float, ...] = DEFAULT_WEBHOOK_SCHEDULE
    log_format: str = "auto"
    log_level: str = "info"
    upload_retries: int = Field(8, ge=0)
    # Worker: a store error that waiting cannot fix (no such bucket, access denied) fails the job after this
    # many tries; transient ones are retried with backoff up to storage_retry_cap_s between tries.
    # (8 tries with the backoff below span about a minute: a directory made read-only for a few seconds
    # survives, a missing bucket fails within a minute)
    storage_permanent_tries: int = Field(8, ge=1, le=100)
    storage_retry_cap_s: float = Field(30.0, gt=0)
    # Worker: a batch running longer than stall_multiple x its expected time (never less than stall_floor_s)
    # is stalled: handed back, and the worker exits non-zero for its supervisor to restart it.
    stall_multiple: float = Field(5.0, ge=1.0)
    stall_floor_s: float = Field(300.0, gt=0)
    # Worker: how long SIGTERM waits for the batch in the engine and its storing before handing back.
    drain_timeout_s: float = Field(600.0, gt=0)
    # Workers: how often one of them (under a Redis lock) reclaims the work of dead workers.
    sweep_interval_s: float = Field(5.0, gt=0)
    # Worker: liveness file for a supervisor's probe (``sdfleet health``); empty: none.
    health_file: str = ""
    # Prometheus /metrics of a long-running role (worker, scheduler, webhook worker) when its
    # --metrics-port is not given; None: no metrics server. 0 picks a free port (logged at start).
    metrics_port: int | None = Field(None, ge=0, le=65535)
    # Job and batch records are deleted this long after their batch completed (housekeeping).
    record_ttl_s: int = Field(DEFAULT_RECORD_TTL_S, ge=60)
    # A hidden .tmp-* partial file (a write killed midway) older than this is deleted (housekeeping).
    partial_file_grace_s: float = Field(DEFAULT_PARTIAL_FILE_GRACE_S, gt=0)
    # Scheduler: a pool is sized to work off its backlog in this many seconds ...
    scale_target_drain_s: float = Field(DEFAULT_TARGET_DRAIN_S, gt=0)
    # ... and shrinks only after its need has stayed lower for this long (it grows at once).
    scale_cooldown_s: float = Field(DEFAULT_SCALE_COOLDOWN_S, ge=0)
    # Where workers on one host take their per-GPU locks; every worker of the host must use the same one.
    gpu_lock_dir: str = DEFAULT_GPU_LOCK_DIR

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, v: str) -> str:
        return parse_redis_url(v)

    @field_validator("log_format")
    @classmethod
    def _log_format(cls, v: str) -> str:
        if v not in ("auto", "json", "console"):
            raise ValueError("must be auto, json or console")
        return v

    @field_validator("webhook_secret", "webhook_previous_secrets")
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
        if "REDIS_URL" in env:  # set but empty is an error, not the default
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
            msg = str(err["msg"]).removeprefix("Value error, ")
            raise ConfigError(f"setting {env_name}: {msg}") from None


# SDFLEET_* variables that belong to tools around sdfleet, not to Settings.
_NOT_SETTINGS = frozenset({"HOME", "TEST_REDIS_URL", "CACHE_DIR"})
