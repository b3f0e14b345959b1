"""The JSON envelope every output carries, and readers that refuse what they do not know."""

from __future__ import annotations

import json

import pytest

from sgdph_tools import __version__
from sgdph_tools.errors import UserError
from sgdph_tools.records import VERSIONS, append_jsonl, read_json, read_jsonl, rewrite_jsonl, write_json


def test_a_json_document_round_trips_in_its_envelope(tmp_path):
    path = write_json(tmp_path / "b.json", "bench", [{"step_ms": 1.0}], rounds=2)
    data = json.loads(path.read_text())
    assert data == {
        "format": "sgdph-tools/bench",
        "version": VERSIONS["bench"],
        "sgdph_tools_version": __version__,
        "rounds": 2,
        "records": [{"step_ms": 1.0}],
    }
    assert read_json(path, "bench")["records"] == [{"step_ms": 1.0}]


@pytest.mark.parametrize(
    "content, message",
    [
        ('[{"step_ms": 1.0}]', "no format field"),  # a bare list, as bench wrote before the envelope
        ('{"format": "sgdph-tools/hessian", "version": 1, "records": []}', "is a sgdph-tools/hessian file, not"),
        (
            '{"format": "sgdph-tools/bench", "version": 99, "sgdph_tools_version": "9.0", "records": []}',
            "reads versions up to 1: upgrade",
        ),
        ('{"format": "sgdph-tools/bench", "version": "1", "records": []}', "version '1'"),
        ("{not json", "not valid JSON"),
    ],
)
def test_readers_name_what_they_found_and_what_they_expected(tmp_path, content, message):
    path = tmp_path / "x.json"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        read_json(path, "bench")
    with pytest.raises(UserError, match="no such file"):
        read_json(tmp_path / "missing.json", "bench")


def test_json_lines_have_a_header_line_and_old_headerless_files_still_read(tmp_path):
    path = tmp_path / "metrics.jsonl"
    append_jsonl(path, "metrics", {"epoch": 1})
    append_jsonl(path, "metrics", {"epoch": 2})
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0]["format"] == "sgdph-tools/metrics" and "records" not in lines[0] and len(lines) == 3
    assert read_jsonl(path, "metrics") == [{"epoch": 1}, {"epoch": 2}]
    rewrite_jsonl(path, "metrics", [{"epoch": 1}])
    assert read_jsonl(path, "metrics") == [{"epoch": 1}]
    old = tmp_path / "old.jsonl"  # sgdph-tools 0.1.0: records only
    old.write_text('{"epoch": 1}\n{"epoch": 2}\n')
    assert read_jsonl(old, "metrics") == [{"epoch": 1}, {"epoch": 2}]
    newer = tmp_path / "newer.jsonl"
    newer.write_text('{"format": "sgdph-tools/metrics", "version": 7}\n{"epoch": 1}\n')
    with pytest.raises(UserError, match="version 7"):
        read_jsonl(newer, "metrics")
    assert read_jsonl(tmp_path / "absent.jsonl", "metrics") == []
