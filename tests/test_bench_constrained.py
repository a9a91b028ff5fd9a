"""The constrained benchmarks' helpers: the JSON prompt, fields_filled, merged coverage sections."""

from __future__ import annotations

import json
import re._parser as re_parser

import pytest
from decodekit.bench.common import DATA, fields_filled, json_schema_prompt, optional_fields
from decodekit.bench.json_schema_coverage import earlier_parts

SCHEMA = {"type": "object", "properties": {"id": {}, "name": {}, "tags": {}}, "required": ["id"]}


def test_fields_filled_counts_optional_properties_and_unparsed_answers_as_absent():
    assert optional_fields(SCHEMA, '{"id":1,"name":"x"}') == (1, 2)
    assert optional_fields(SCHEMA, '{"id":1,"name":"x","ta') == (0, 2)  # cut off: nothing present
    assert optional_fields({"type": "string"}, '"a"') == (0, 0)
    assert fields_filled([(1, 2), (0, 2), (0, 0)]) == 0.25
    assert fields_filled([(0, 0)]) is None


def test_json_prompt_states_the_schema_and_names_the_fields():
    text = json.dumps(SCHEMA)
    messages = json_schema_prompt(text)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert "never the schema" in messages[0]["content"]
    json.loads(messages[2]["content"])  # the worked instance is JSON
    assert text in messages[-1]["content"] and "id, name, tags" in messages[-1]["content"]
    assert "Use the properties" not in json_schema_prompt('{"type":"array"}')[-1]["content"]


def test_coverage_sections_kept_from_the_last_run(tmp_path):
    old = {"quick": False, "date": "2026-11-29 22:08", "maskbench": {"of": 424}, "test_suite": {"schemas": 582},
           "generation": {"completed_rate": 0.5}, "details": {"generation": [{"schema": "a"}]}}
    (tmp_path / "json_schema_coverage.json").write_text(json.dumps(old))
    got = earlier_parts(str(tmp_path), quick=False)
    assert got["date"] == "2026-11-29 22:08" and got["parts"]["maskbench"] == {"of": 424}
    assert got["parts"]["generation_rows"] == [{"schema": "a"}]
    assert earlier_parts(str(tmp_path), quick=True) == {}  # a quick run never borrows a full run's figures


@pytest.mark.skipif(not (DATA / "pattern_matching").exists(), reason="no shared regex data")
def test_peer_regex_items_have_long_answers():
    from decodekit.bench.constrained_batch import MIN_PEER_TOKENS, peer_regex_items

    items = peer_regex_items(4)
    assert len(items) == 4
    assert all(re_parser.parse(p).getwidth()[0] >= MIN_PEER_TOKENS for _, _, p in items)
