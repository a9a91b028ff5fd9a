"""bench/server_load.py's pure helpers, without a model or a server."""

import json

import pytest
from decodekit.bench.server_load import (
    CASES,
    fit_prompt,
    gaps_after,
    metric_value,
    parse_cases,
    peak_overlap,
    pick_schemas,
    rounded,
    schema_name,
)
from decodekit.bench.targets import check


def test_parse_cases():
    assert parse_cases("all") == list(CASES)
    assert parse_cases("") == list(CASES)
    assert parse_cases("long, schemas") == ["schemas", "long"]  # run order, not the given order
    assert parse_cases("2048") == ["2048"]
    with pytest.raises(ValueError, match="unknown"):
        parse_cases("schemas,nope")


def test_metric_value():
    text = ("# HELP decodekit_engine_max_batch_sequences largest batch seen\n"
            "# TYPE decodekit_engine_max_batch_sequences gauge\n"
            "decodekit_engine_max_batch_sequences 7\n"
            'decodekit_requests_total{endpoint="/health",status="200"} 3\n'
            "decodekit_cache_hit_rate 0.25\n")
    assert metric_value(text, "decodekit_engine_max_batch_sequences") == 7
    assert metric_value(text, "decodekit_cache_hit_rate") == 0.25
    assert metric_value(text, "decodekit_requests_total") is None  # labelled samples are not read
    assert metric_value(text, "missing") is None


def test_peak_overlap():
    assert peak_overlap([]) == 0
    assert peak_overlap([(0, 1), (1, 2), (2, 3)]) == 1  # touching ends do not overlap
    assert peak_overlap([(0, 10), (1, 2), (1.5, 3), (5, 6)]) == 3
    assert peak_overlap([(0, 1)] * 16) == 16


def test_gaps_after():
    times = [0.0, 0.1, 0.2, 1.0, 1.1]
    assert gaps_after(times, 0.5) == pytest.approx([0.8, 0.1])  # the gap spanning t0 counts whole
    assert gaps_after(times, 2.0) == []
    assert gaps_after([0.3], 0.0) == []


def test_pick_schemas(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a").mkdir()
    (tmp_path / "b" / "1.json").write_text(json.dumps({"type": "string"}))
    (tmp_path / "a" / "2.json").write_text(json.dumps({"type": "integer"}))
    (tmp_path / "a" / "1.json").write_text(json.dumps({"type": "bad"}))
    (tmp_path / "a" / "3.json").write_text("{not json")
    (tmp_path / "a" / "4.json").write_text(json.dumps({"type": "string", "description": "x" * 700}))

    def compiles(schema):
        if schema["type"] == "bad":
            raise ValueError("unsupported")

    assert pick_schemas(tmp_path, 2, 600, compiles) == [("a/2.json", {"type": "integer"}),
                                                         ("b/1.json", {"type": "string"})]
    with pytest.raises(SystemExit):
        pick_schemas(tmp_path, 3, 600, compiles)


def test_schema_name():
    assert schema_name("Github_easy/o9.1-x.json") == "o9_1-x"
    assert len(schema_name("a/" + "x" * 100 + ".json")) == 64


def test_fit_prompt():
    def count(text):
        return len(text.split())

    def wrap(text):
        return f"Q1. {text} end"

    pieces = ["one two three four", "five six seven", "eight nine ten"]
    out = fit_prompt(pieces, 8, count, wrap)
    assert count(out) == 8 and out.startswith("Q1. one two") and out.endswith(" end")
    with pytest.raises(ValueError):
        fit_prompt(pieces, 50, count, wrap)


def test_rounded():
    assert rounded(None) is None
    assert rounded(float("nan")) is None
    assert rounded(1.23456, 2) == 1.23


def test_new_targets():
    summary = {"batching_speedup_16": 4.0, "errors": 0, "schemas_speedup": 2.0, "schemas_errors": 0,
               "peak_batch_2048": 16, "long_prompt_itl_p99_s": 2.0,
               "tools": {"valid_calls": 1.0, "speedup_16": 2.5, "errors": 0}}
    verdicts = {label: verdict for label, _, _, verdict in check("server_load", summary)}
    assert list(verdicts.values()) == ["met", "met", "missed", "met", "met", "missed", "met", "missed", "met"]
    partial = check("server_load", {"batching_speedup_16": 4.0, "errors": 0})
    assert [v for *_, v in partial][2:] == ["missing field 'schemas_speedup'", "missing field 'schemas_errors'",
                                            "missing field 'peak_batch_2048'",
                                            "missing field 'long_prompt_itl_p99_s'",
                                            "missing field 'tools/valid_calls'", "missing field 'tools/speedup_16'",
                                            "missing field 'tools/errors'"]


def test_summaries(tmp_path):
    """The summary fields each case adds, from synthetic measurements (the levels fields as before)."""
    from types import SimpleNamespace

    from decodekit.bench.server_load import LEVELS, batch_2048_summary, levels_summary, long_summary, schemas_summary

    def req(tokens):
        return {"ttft_s": 0.1, "latency_s": 1.0, "tokens": tokens, "error": None, "done": True}

    raw = {c: [{"wall_s": 16 / c, "requests": [req(4) for _ in range(16)]}] for c in LEVELS}
    fields, table, details, met = levels_summary(SimpleNamespace(out=str(tmp_path)),
                                                 {"raw": raw, "num_requests": 16, "max_tokens": 4, "rounds": 1})
    assert fields["batching_speedup_16"] == 16.0 and fields["errors"] == 0 and met
    assert set(details) == {"1", "4", "16"} and "| 16 |" in table

    fields, _, met = schemas_summary({"schemas": ["a/1.json"] * 16, "max_tokens": 16, "rounds": 1,
                                      "serial_tokens_per_s": 10.0, "concurrent_tokens_per_s": 25.0, "speedup": 2.5,
                                      "errors": 0, "finish_reasons": {"stop": 32}})
    assert fields["schemas_speedup"] == 2.5 and fields["schemas_errors"] == 0 and not met

    fields, _, met = batch_2048_summary({"clients": 16, "stop": ["\n"], "peak_batch_gauge": 16,
                                         "peak_streaming_client": 15, "peak_running_polled": 16,
                                         "peak_queue_polled": 0, "answer_tokens_max": 40, "answer_tokens_mean": 20.0,
                                         "errors": 0})
    assert fields["peak_batch_2048"] == 16 and met

    fields, _, met = long_summary({"prompt_tokens_target": 2000, "prompt_tokens": 2000, "cached_tokens": 0,
                                   "streams": 8, "stream_max_tokens": 64, "sent_after_s": 1.0,
                                   "stream_tokens_at_send": [2] * 8, "gaps": 0, "itl_p50_s": None,
                                   "itl_p99_s": None, "itl_max_s": None, "itl_p50_before_s": 0.1,
                                   "long_ttft_s": 3.0, "errors": 0})
    assert fields["long_prompt_itl_p99_s"] is None and not met  # no gap measured: not a pass


def test_tools_case_bodies_and_summary():
    from decodekit.bench.server_tools import NUM_CLIENTS, bodies, summary

    sent = bodies("m", 8)
    assert len(sent) == NUM_CLIENTS and len({json.dumps(b["tools"]) for b in sent}) == NUM_CLIENTS
    assert {b["tool_choice"] for b in sent} == {"required", "auto"}
    fields, table, met = summary({"num_calls": 10, "num_valid": 10, "speedup": 3.5, "errors": 0,
                                  "call_rate": {"required": 1.0, "auto": 0.25}, "serial_tokens_per_s": 5.0,
                                  "concurrent_tokens_per_s": 17.5, "max_tokens": 8, "rounds": 1})
    assert fields["tools"]["valid_calls"] == 1.0 and fields["tools"]["speedup_16"] == 3.5 and met
