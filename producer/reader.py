"""Reading a job file: JSONL (one job object a line) or plain text (one prompt a line).

Every line is checked before anything is enqueued; errors carry the line number and the field.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from sdfleet.errors import InvalidJob
from sdfleet.jobs import JobSpec, parse_job

MAX_LINE_BYTES = 256 * 1024
# A job is a flat object with one list (webhook_events); anything deeper is not a job, and Python's JSON
# parser would hit its recursion limit at about 1,000 levels.
MAX_JSON_DEPTH = 8


@dataclass
class ReadResult:
    jobs: list[tuple[int, JobSpec]] = field(default_factory=list)
    errors: list[InvalidJob] = field(default_factory=list)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows; use a finite number")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            # The last value would win silently: '"custom_id":"../x","custom_id":"ok"' must not pass as "ok".
            raise InvalidJob("appears twice in one object; give each field once", field=str(key)[:60])
        out[key] = value
    return out


def _depth(text: str) -> int:
    """How deeply brackets nest in ``text``, outside JSON strings."""
    depth = deepest = 0
    in_string = escaped = False
    for c in text:
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "]}":
            depth -= 1
    return deepest


def load_json_line(text: str, line: int) -> Any:
    """One JSONL line as a Python value; InvalidJob naming the line for anything that is not plain JSON."""
    # Counting brackets is cheap in C; the exact scan runs only for lines that might nest too deeply.
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and _depth(text) > MAX_JSON_DEPTH:
        raise InvalidJob(f"JSON nested more than {MAX_JSON_DEPTH} levels deep; a job is one flat object",
                         line=line)
    try:
        return json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_no_duplicate_keys)
    except InvalidJob as exc:
        raise InvalidJob(exc.reason, field=exc.field, line=line) from None
    except RecursionError:
        raise InvalidJob("JSON nested too deeply; a job is one flat object", line=line) from None
    except ValueError as exc:
        raise InvalidJob(f"not valid JSON ({exc}); write one JSON object per line", line=line) from None


def text_custom_id(line: int) -> str:
    """The custom id of a plain-text line: its line number, so resubmitting the file finds the same jobs."""
    return f"line-{line:06d}"


def detect_format(path: str | Path, lines: list[str]) -> str:
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if suffix == ".txt":
        return "text"
    first = next((ln for ln in lines if ln.strip()), "")
    return "jsonl" if first.lstrip().startswith("{") else "text"


def read_lines(data: bytes) -> tuple[list[str], list[InvalidJob]]:
    """Split bytes into text lines: BOM stripped, CRLF accepted, invalid UTF-8 reported per line."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    lines: list[str] = []
    errors: list[InvalidJob] = []
    for n, raw in enumerate(data.split(b"\n"), start=1):
        raw = raw.removesuffix(b"\r")
        if len(raw) > MAX_LINE_BYTES:
            errors.append(InvalidJob(f"line is {len(raw)} bytes, more than {MAX_LINE_BYTES}; shorten it", line=n))
            lines.append("")
            continue
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            errors.append(InvalidJob(f"not valid UTF-8 at byte {exc.start}; save the file as UTF-8", line=n))
            lines.append("")
    return lines, errors


def parse_lines(lines: Iterable[str], fmt: str, defaults: dict[str, Any], start_errors: list[InvalidJob] | None = None) -> ReadResult:
    result = ReadResult(errors=list(start_errors or []))
    bad_lines = {e.line for e in result.errors}
    seen_custom: dict[str, int] = {}
    for n, text in enumerate(lines, start=1):
        if n in bad_lines or not text.strip():
            continue
        try:
            if fmt == "jsonl":
                data = load_json_line(text, n)
            else:
                data = {"prompt": text.strip(), "custom_id": text_custom_id(n)}
            spec = parse_job(data, line=n, defaults=defaults)
            if spec.custom_id is not None:
                if spec.custom_id in seen_custom:
                    raise InvalidJob(f"'{spec.custom_id}' already used on line {seen_custom[spec.custom_id]}; "
                                     "custom ids must be unique within a batch", field="custom_id", line=n)
                seen_custom[spec.custom_id] = n
            result.jobs.append((n, spec))
        except InvalidJob as exc:
            result.errors.append(exc)
    result.errors.sort(key=lambda e: e.line or 0)
    return result


def read_file(path: str | Path, defaults: dict[str, Any], *, stdin: BinaryIO | None = None) -> ReadResult:
    """Read and validate a job file; ``-`` reads standard input (format told by its first line)."""
    if str(path) == "-":
        data = (stdin or sys.stdin.buffer).read()
        p = Path("stdin")
    else:
        p = Path(path)
        try:
            data = p.read_bytes()
        except OSError as exc:
            raise InvalidJob(f"cannot read {path}: {exc.strerror}; check the path") from None
    lines, errors = read_lines(data)
    return parse_lines(lines, detect_format(p, lines), defaults, errors)
