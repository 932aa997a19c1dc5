"""The job contract: what one text-to-image job is, and how it is validated.

A job is a typed, frozen record. Every rejection names the field and how to fix it; validation
happens entirely before anything touches Redis or the GPU.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import re
import secrets
import unicodedata
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from sdfleet.errors import InvalidJob

MAX_PROMPT_CHARS = 4000
MIN_SIDE, MAX_SIDE, SIDE_MULTIPLE = 256, 2048, 16
MAX_STEPS = 150
MAX_GUIDANCE = 30.0
MAX_SEED = 2**32 - 1
EVENTS = ("job.succeeded", "job.failed", "job.cancelled", "batch.completed")

# Every pattern is used with fullmatch: '$' would also match before a final newline ("tiny\n").
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_MODEL = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_S3_OUT = re.compile(r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^\x00-\x1f\x7f]*)?")
# Schemes are case-insensitive (RFC 3986 3.1): HTTPS://host/ is an https URL.
_HTTP_URL = re.compile(r"https?://[^/\s]+\S*", re.IGNORECASE)
# Built-in model names a worker accepts, and the queue each one serves (a directory serves its basename).
# Random-weight SD3.5 (noise, the real FLOPs) gets a queue of its own: sharing the real model's queue, a bench
# worker beside the fleet would take customers' jobs and store noise as succeeded. tiny and null are test
# engines; a directory named like them (what ``make-model tiny`` writes) is a test model too.
BUILTIN_MODELS = {"tiny": "tiny", "null": "null", "medium": "sd3.5-medium-random", "large": "sd3.5-large-random"}
# Letters that render as nothing although Unicode files them as letters or symbols (Hangul fillers, the
# blank Braille pattern): a prompt made only of these is as empty as one of zero-width spaces.
_BLANK_GLYPHS = frozenset("\u115f\u1160\u3164\uffa0\u2800")

# How to fix each field, appended to the error message.
_FIX = {
    "prompt": f"give a text with at least one visible character, at most {MAX_PROMPT_CHARS} characters",
    "negative_prompt": f"give a text of at most {MAX_PROMPT_CHARS} characters, or leave it out",
    "width": f"use a whole number, a multiple of {SIDE_MULTIPLE} from {MIN_SIDE} to {MAX_SIDE} (e.g. 1024)",
    "height": f"use a whole number, a multiple of {SIDE_MULTIPLE} from {MIN_SIDE} to {MAX_SIDE} (e.g. 1024)",
    "steps": f"use a whole number from 1 to {MAX_STEPS} (e.g. 28)",
    "guidance_scale": f"use a finite number from 0 to {MAX_GUIDANCE:g} (e.g. 4.5)",
    "seed": f"use a whole number from 0 to {MAX_SEED}, or leave it out for a random (recorded) seed",
    "model": "use the name or directory the worker was given ('tiny', 'large', /models/sd3.5-large); "
             "the queue is its lower-cased basename (letters, digits, '.', '_', '-')",
    "custom_id": "use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit",
    "out": "use file://DIR or s3://bucket/prefix",
    "webhook": "use an http:// or https:// URL",
    "webhook_events": f"use a list drawn from {', '.join(EVENTS)}",
}


class JobSpec(BaseModel):
    """One text-to-image job as submitted. ``seed`` is None until :meth:`with_seed` fills it."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    prompt: str
    negative_prompt: str = ""
    width: int = 1024
    height: int = 1024
    steps: int = Field(28)
    guidance_scale: float = 4.5
    seed: int | None = None
    model: str = "tiny"
    custom_id: str | None = None
    out: str | None = None
    webhook: str | None = None
    webhook_events: tuple[str, ...] | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("is empty")
        v = _text(v)
        if not any(_visible(c) for c in v):
            raise ValueError("has no visible character (only spaces, zero-width or format characters)")
        return v

    @field_validator("negative_prompt")
    @classmethod
    def _negative(cls, v: str) -> str:
        return _text(v)

    @field_validator("width", "height")
    @classmethod
    def _side(cls, v: int) -> int:
        if not MIN_SIDE <= v <= MAX_SIDE:
            raise ValueError(f"is {v}, outside {MIN_SIDE}..{MAX_SIDE}")
        if v % SIDE_MULTIPLE:
            raise ValueError(f"is {v}, not a multiple of {SIDE_MULTIPLE}")
        return v

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: int) -> int:
        if not 1 <= v <= MAX_STEPS:
            raise ValueError(f"is {v}, outside 1..{MAX_STEPS}")
        return v

    @field_validator("guidance_scale", mode="before")
    @classmethod
    def _guidance(cls, v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"is {type(v).__name__}, not a number")
        if not math.isfinite(v):
            raise ValueError(f"is {v}, not finite")
        if not 0 <= v <= MAX_GUIDANCE:
            raise ValueError(f"is {v}, outside 0..{MAX_GUIDANCE:g}")
        return float(v)

    @field_validator("seed")
    @classmethod
    def _seed(cls, v: int | None) -> int | None:
        if v is not None and not 0 <= v <= MAX_SEED:
            raise ValueError(f"is {v}, outside 0..{MAX_SEED}")
        return v

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        try:
            return model_name_for(v)
        except InvalidJob as exc:
            raise ValueError(exc.reason) from None

    @field_validator("custom_id")
    @classmethod
    def _custom_id(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not _SAFE_ID.fullmatch(v) or ".." in v:
            raise ValueError(f"{v[:40]!r} is not safe in an object key (path-like or unusual characters)")
        return v

    @field_validator("out")
    @classmethod
    def _out(cls, v: str | None) -> str | None:
        if v is None:
            return v
        _utf8(v)
        if _CONTROL.search(v) or "\n" in v or "\r" in v or "\t" in v:
            raise ValueError(f"{v[:60]!r} contains control characters")
        if not (v.startswith("file://") and len(v) > 7 or _S3_OUT.fullmatch(v)):
            raise ValueError(f"{v[:60]!r} is not a storage location")
        return v

    @field_validator("webhook")
    @classmethod
    def _webhook(cls, v: str | None) -> str | None:
        if v is not None:
            _utf8(v)
        if v is not None and not _HTTP_URL.fullmatch(v):
            raise ValueError(f"{v[:60]!r} is not an http(s) URL")
        return v

    @field_validator("webhook_events", mode="before")
    @classmethod
    def _events(cls, v: Any) -> Any:
        if v is None:
            return v
        if not isinstance(v, (list, tuple)) or not all(isinstance(e, str) for e in v):
            raise ValueError("is not a list of event names")
        bad = [e for e in v if e not in EVENTS]
        if bad:
            raise ValueError(f"has unknown event(s) {bad}")
        return tuple(v)

    # --- helpers -------------------------------------------------------------------------------

    def with_seed(self) -> JobSpec:
        """This job with a seed: its own, or a fresh random one (recorded with the job)."""
        if self.seed is not None:
            return self
        return self.model_copy(update={"seed": secrets.randbelow(MAX_SEED + 1)})

    @property
    def key(self) -> BatchKey:
        return BatchKey(self.model, self.width, self.height, self.steps, self.guidance_scale)

    def identity(self) -> str:
        """A content hash of what the user asked for (seed only if given), for default custom ids."""
        fields = self.model_dump(exclude={"custom_id", "out", "webhook", "webhook_events"})
        blob = json.dumps(fields, sort_keys=True, ensure_ascii=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True, order=True)
class BatchKey:
    """Jobs with equal keys can share one engine run; jobs with different keys never do."""

    model: str
    width: int
    height: int
    steps: int
    guidance_scale: float

    def __str__(self) -> str:
        return f"{self.model}/{self.width}x{self.height}/{self.steps}st/g{self.guidance_scale:g}"


def _text(v: str) -> str:
    if len(v) > MAX_PROMPT_CHARS:
        raise ValueError(f"has {len(v)} characters, more than {MAX_PROMPT_CHARS}")
    if _CONTROL.search(v):
        raise ValueError("contains control characters (e.g. NUL)")
    # A lone surrogate ("\ud800" in JSON) is no character at all: it cannot be stored as UTF-8.
    if any("\ud800" <= c <= "\udfff" for c in v):
        raise ValueError("contains a lone surrogate (an unpaired \\ud800-\\udfff escape); write the character itself")
    return v


def _utf8(v: str) -> None:
    # A non-UTF-8 byte in argv reaches Python as a lone surrogate: refuse it here, by the field's name, rather
    # than when the whole job fails to serialise.
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{v[:60]!a} is not valid UTF-8 (at character {exc.start})") from None


def _visible(c: str) -> bool:
    return unicodedata.category(c)[0] in "LNPS" and c not in _BLANK_GLYPHS


def model_name_for(value: str) -> str:
    """The queue's model name for what a worker was given: a built-in name or a model directory.

    ``tiny`` and ``null`` are themselves, ``medium`` and ``large`` (random-weight SD3.5) serve
    ``sd3.5-medium-random`` and ``sd3.5-large-random`` (never the real model's queue), and a directory such as ``/models/SD3.5-Large/`` serves its basename,
    lower-cased (``sd3.5-large``). Raises InvalidJob (field ``model``) for anything that gives no valid name.
    """
    if not isinstance(value, str) or not value or _CONTROL.search(value) or any(c.isspace() for c in value):
        raise InvalidJob(f"{str(value)[:40]!r} is not a model name or directory (empty, spaces or control "
                         "characters)", field="model")
    if value in BUILTIN_MODELS:
        return BUILTIN_MODELS[value]
    base = value.rstrip("/").rsplit("/", 1)[-1].lower() if "/" in value else value.lower()
    if base in ("", ".", "..") or not _MODEL.fullmatch(base):
        raise InvalidJob(f"{value[:60]!r} gives no valid model name (the lower-cased basename must be 1-64 "
                         "letters, digits, '.', '_' or '-', starting with a letter or digit)", field="model")
    return base


FIELDS = tuple(JobSpec.model_fields)


def shown_name(name: Any) -> str:
    """A field name from a job file as it may be printed: escaped like a value when it holds anything a
    terminal would act on (ESC, BEL, ...), so a file cannot retitle or clear the operator's terminal."""
    text = str(name)[:60]
    return text if text.isprintable() else ascii(text)[1:-1]


def parse_job(data: Any, *, line: int | None = None, defaults: dict[str, Any] | None = None) -> JobSpec:
    """Validate one job (a dict from JSON) over ``defaults``; raise :class:`InvalidJob` naming the field."""
    if not isinstance(data, dict):
        raise InvalidJob(f"expected a JSON object, got {type(data).__name__}", line=line)
    for name in data:
        if name not in JobSpec.model_fields:
            close = difflib.get_close_matches(str(name), FIELDS, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known fields: {', '.join(FIELDS)}"
            raise InvalidJob(f"unknown field{hint}", field=shown_name(name), line=line)
    merged = {**(defaults or {}), **{k: v for k, v in data.items()}}
    # JSON has one number type: accept 7.0 for an integer field but not 7.5 or true.
    for name in ("width", "height", "steps", "seed"):
        value = merged.get(name)
        if isinstance(value, float) and value.is_integer() and math.isfinite(value):
            merged[name] = int(value)
    if isinstance(merged.get("webhook_events"), list):
        merged["webhook_events"] = tuple(merged["webhook_events"])
    try:
        return JobSpec(**merged)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else None
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] in ("int_type", "string_type", "float_type", "bool_type", "tuple_type"):
            got = merged.get(field) if field else None
            msg = f"expected {err['type'].split('_')[0]}, got {type(got).__name__} {str(got)[:30]!r}"
        elif err["type"] == "missing":
            msg = "is required"
        fix = _FIX.get(field or "", "")
        raise InvalidJob(f"{msg}; {fix}" if fix else msg, field=field, line=line) from None
