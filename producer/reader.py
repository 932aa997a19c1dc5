"""Reading a job file: JSONL (one job object a line) or plain text (one prompt a line).

Every line is checked before anything is enqueued; errors carry the line number and the field.
"""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from sdfleet.errors import InvalidJob
from sdfleet.jobs import JobSpec, parse_job, shown_name

MAX_LINE_BYTES = 256 * 1024
# The most one submission reads: a million long prompts. Beyond it the input is refused before it fills memory.
MAX_INPUT_BYTES = 1 << 30
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
            raise InvalidJob("appears twice in one object; give each field once", field=shown_name(key))
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
    return read_stream(io.BytesIO(data), "the input")


def read_stream(stream: BinaryIO, name: str) -> tuple[list[str], list[InvalidJob]]:
    """:func:`read_lines` over a stream, line by line: no line is held past MAX_LINE_BYTES, and an input
    past MAX_INPUT_BYTES is refused, so /dev/zero or an endless pipe ends in an error instead of all memory."""
    lines: list[str] = []
    errors: list[InvalidJob] = []
    total = 0
    while True:
        raw = stream.readline(MAX_LINE_BYTES + 2)  # + CRLF: a line of exactly the limit still fits
        if not raw:
            break
        total += len(raw)
        length = len(raw)
        while not raw.endswith(b"\n") and length > MAX_LINE_BYTES and total <= MAX_INPUT_BYTES:
            raw = stream.readline(1 << 20)  # the rest of a line too long to be a job: counted, not kept
            if not raw:
                break
            length += len(raw)
            total += len(raw)
        if total > MAX_INPUT_BYTES:
            raise InvalidJob(f"{name} is larger than {MAX_INPUT_BYTES >> 20} MiB, the limit of one submission; "
                             "split it into several files")
        n = len(lines) + 1
        if length > MAX_LINE_BYTES + 2:
            errors.append(InvalidJob(f"line is {length} bytes, more than {MAX_LINE_BYTES}; shorten it", line=n))
            lines.append("")
            continue
        if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        raw = raw.removesuffix(b"\n").removesuffix(b"\r")
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
    result.errors += _derived_collisions(result.jobs, seen_custom)
    result.errors.sort(key=lambda e: e.line or 0)
    return result


def _derived_collisions(jobs: list[tuple[int, JobSpec]], given: dict[str, int]) -> list[InvalidJob]:
    """A custom_id given on one line that equals the id derived for a line without one (its content hash,
    with the repeat suffix): the two jobs would share one id and one of them would silently never exist."""
    from producer.submit import assign_custom_ids

    unnamed = [(n, spec) for n, spec in jobs if spec.custom_id is None]
    if not unnamed or not given:
        return []
    errors = []
    for (n, _), spec in zip(unnamed, assign_custom_ids([spec for _, spec in unnamed])):
        if spec.custom_id in given:
            errors.append(InvalidJob(f"'{spec.custom_id}' is also the id derived for line {n}, which gives no "
                                     "custom_id; give that line a custom_id or choose another one here",
                                     field="custom_id", line=given[spec.custom_id]))
    bad = {e.line for e in errors}
    jobs[:] = [(n, spec) for n, spec in jobs if n not in bad]
    return errors


def read_file(path: str | Path, defaults: dict[str, Any], *, stdin: BinaryIO | None = None) -> ReadResult:
    """Read and validate a job file; ``-`` reads standard input (format told by its first line)."""
    if str(path) == "-":
        p = Path("stdin")
        lines, errors = read_stream(stdin or sys.stdin.buffer, "standard input")
    else:
        p = Path(path)
        try:
            with p.open("rb") as f:
                lines, errors = read_stream(f, str(path))
        except OSError as exc:
            raise InvalidJob(f"cannot read {path}: {exc.strerror}; check the path") from None
    return parse_lines(lines, detect_format(p, lines), defaults, errors)
