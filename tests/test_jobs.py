"""The job contract and the job-file reader: every bad input gets an error naming the line and field."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from producer.reader import parse_lines, read_lines
from sdfleet.errors import InvalidJob
from sdfleet.jobs import JobSpec, model_name_for, parse_job


def err(data, **kw) -> InvalidJob:
    with pytest.raises(InvalidJob) as info:
        parse_job(data, **kw)
    return info.value


@pytest.mark.parametrize("data, field, words", [
    ({"prompt": ""}, "prompt", "empty"),
    ({"prompt": "   "}, "prompt", "empty"),
    ({"prompt": "x" * 100_000}, "prompt", "more than"),
    ({"prompt": "a\x00b"}, "prompt", "control"),
    ({"prompt": "a", "negative_prompt": "x" * 5000}, "negative_prompt", "more than"),
    ({"prompt": "a", "width": 500}, "width", "multiple of 16"),
    ({"prompt": "a", "height": 4096}, "height", "outside"),
    ({"prompt": "a", "width": 240}, "width", "outside"),
    ({"prompt": "a", "width": 512.5}, "width", "expected int"),
    ({"prompt": "a", "width": "512"}, "width", "expected int"),
    ({"prompt": "a", "steps": 0}, "steps", "outside"),
    ({"prompt": "a", "steps": 151}, "steps", "outside"),
    ({"prompt": "a", "steps": True}, "steps", "expected int"),
    ({"prompt": "a", "guidance_scale": float("nan")}, "guidance_scale", "not finite"),
    ({"prompt": "a", "guidance_scale": float("inf")}, "guidance_scale", "not finite"),
    ({"prompt": "a", "guidance_scale": 31}, "guidance_scale", "outside"),
    ({"prompt": "a", "guidance_scale": -1}, "guidance_scale", "outside"),
    ({"prompt": "a", "seed": -1}, "seed", "outside"),
    ({"prompt": "a", "seed": 2**32}, "seed", "outside"),
    ({"prompt": "a", "seed": 10**400}, "seed", "outside"),
    ({"prompt": "a", "custom_id": "../etc/passwd"}, "custom_id", "not safe"),
    ({"prompt": "a", "custom_id": "a/b"}, "custom_id", "not safe"),
    ({"prompt": "a", "custom_id": ".hidden"}, "custom_id", "not safe"),
    ({"prompt": "a", "custom_id": "a..b"}, "custom_id", "not safe"),
    ({"prompt": "a", "model": "bad!name"}, "model", "no valid model name"),
    ({"prompt": "a", "model": "tiny\n"}, "model", "control characters"),
    ({"prompt": "a", "model": "/"}, "model", "no valid model name"),
    ({"prompt": "a", "custom_id": "nl\n"}, "custom_id", "not safe"),
    ({"prompt": "\u200b\u2060\ufeff"}, "prompt", "no visible character"),
    ({"prompt": "\u3164\u2800 "}, "prompt", "no visible character"),
    ({"prompt": "x\ud800"}, "prompt", "lone surrogate"),
    ({"prompt": "a", "out": "s3://Bad_Bucket!/x"}, "out", "not a storage location"),
    ({"prompt": "a", "out": "s3://bucket/x\n"}, "out", "control characters"),
    ({"prompt": "a", "webhook": "https://example.com/h\n"}, "webhook", "not an http"),
    ({"prompt": "a", "webhook": "ftp://example.com/x"}, "webhook", "not an http"),
    ({"prompt": "a", "webhook": "javascript:alert(1)"}, "webhook", "not an http"),
    ({"prompt": "a", "out": "/tmp/x"}, "out", "not a storage location"),
    ({"prompt": "a", "webhook_events": ["job.done"]}, "webhook_events", "unknown event"),
    ({"prompt": 5}, "prompt", "expected str"),
    ({}, "prompt", "required"),
])
def test_bad_fields_name_the_field_and_the_fix(data, field, words):
    e = err(data, line=7)
    assert e.field == field and e.line == 7
    assert words in str(e)
    assert str(e).startswith(f"line 7, field '{field}'")
    assert "; " in str(e), "the message carries a fix after the reason"


def test_unknown_field_suggests_near_miss():
    e = err({"prompt": "a", "guidance": 3})
    assert e.field == "guidance" and "did you mean 'guidance_scale'" in str(e)
    e = err({"prompt": "a", "zzz": 3})
    assert "known fields" in str(e)


def test_defaults_and_overrides():
    spec = parse_job({"prompt": "a", "steps": 10}, defaults={"steps": 20, "width": 512})
    assert (spec.steps, spec.width, spec.height) == (10, 512, 1024)
    assert parse_job({"prompt": "a", "width": 512.0}).width == 512  # JSON's one number type


def test_seed_is_random_when_absent_and_recorded():
    spec = parse_job({"prompt": "a"})
    assert spec.seed is None
    seeded = spec.with_seed()
    assert 0 <= seeded.seed < 2**32 and seeded.with_seed() is seeded


def test_key_groups_compatible_jobs():
    a = parse_job({"prompt": "a", "width": 512, "height": 512})
    b = parse_job({"prompt": "b", "width": 512, "height": 512, "seed": 3})
    c = parse_job({"prompt": "a", "width": 512, "height": 768})
    assert a.key == b.key != c.key


def lines_of(text: bytes):
    return read_lines(text)


def test_reader_handles_bom_crlf_and_reports_invalid_utf8():
    data = b"\xef\xbb\xbf" + b'{"prompt": "a"}\r\n{"prompt": "b\xff"}\r\n\r\n{"prompt": "c"}\n'
    lines, errors = read_lines(data)
    res = parse_lines(lines, "jsonl", {}, errors)
    assert [s.prompt for _, s in res.jobs] == ["a", "c"]
    assert [(e.line, "UTF-8" in str(e)) for e in res.errors] == [(2, True)]


@pytest.mark.parametrize("line, words", [
    ("not json", "not valid JSON"),
    ('{"prompt": "a", "guidance_scale": NaN}', "NaN"),
    ('{"prompt": "a", "steps": Infinity}', "Infinity"),
    ("[1, 2]", "expected a JSON object"),
    ('"just a string"', "expected a JSON object"),
    ('{"prompt": "a",}', "not valid JSON"),
])
def test_reader_rejects_non_json_lines(line, words):
    res = parse_lines(['{"prompt": "ok"}', line], "jsonl", {})
    assert len(res.errors) == 1 and res.errors[0].line == 2 and words in str(res.errors[0])


def test_duplicate_custom_ids_are_rejected_with_both_lines():
    res = parse_lines([json.dumps({"prompt": "a", "custom_id": "x"}), json.dumps({"prompt": "b", "custom_id": "x"})],
                      "jsonl", {})
    assert len(res.errors) == 1 and res.errors[0].line == 2 and "line 1" in str(res.errors[0])


def test_plain_text_is_one_prompt_per_line():
    res = parse_lines(["a cat", "", "  a dog  "], "text", {"steps": 4})
    assert [(n, s.prompt, s.steps) for n, s in res.jobs] == [(1, "a cat", 4), (3, "a dog", 4)]


def test_spec_is_frozen():
    spec = JobSpec(prompt="a")
    with pytest.raises(ValidationError):
        spec.prompt = "b"  # type: ignore[misc]


@pytest.mark.parametrize("given, queue_model", [
    ("tiny", "tiny"), ("null", "null"), ("medium", "sd3.5-medium-random"), ("large", "sd3.5-large-random"),
    ("/models/sd3.5-large", "sd3.5-large"), ("/models/SD3.5-Large/", "sd3.5-large"), ("sd3.5-large", "sd3.5-large"),
    ("./weights/my_model.v2", "my_model.v2"),
])
def test_model_name_for_maps_what_the_worker_was_given(given, queue_model):
    assert model_name_for(given) == queue_model
    assert parse_job({"prompt": "a", "model": given}).model == queue_model


@pytest.mark.parametrize("given", ["", "tiny\n", "a b", "/", "..", "/models/bad!", "x" * 65, "\x00"])
def test_model_name_for_refuses_what_names_no_queue(given):
    with pytest.raises(InvalidJob) as info:
        model_name_for(given)
    assert info.value.field == "model"


@pytest.mark.parametrize("line, field, words", [
    ('{"prompt": "a", "custom_id": "../../x", "custom_id": "ok1"}', "custom_id", "appears twice"),
    ('{"prompt": "a", "prompt": "b"}', "prompt", "appears twice"),
    ('{"prompt": "a", "webhook_events": [' + "[" * 20 + "]" * 20 + "]}", None, "nested more than"),
    ("[" * 1000 + "]" * 1000, None, "nested"),
    ('{"prompt": "' + "[" * 50 + '"}', None, None),  # brackets inside a string are text, not nesting
])
def test_reader_depth_limit_and_duplicate_keys(line, field, words):
    res = parse_lines([line], "jsonl", {})
    if words is None:
        assert not res.errors and res.jobs[0][1].prompt == "[" * 50
        return
    (e,) = res.errors
    assert e.line == 1 and e.field == field and words in str(e)


def test_plain_text_lines_get_line_number_custom_ids():
    res = parse_lines(["a cat", "", "a dog"], "text", {})
    assert [(n, s.custom_id) for n, s in res.jobs] == [(1, "line-000001"), (3, "line-000003")]
