"""What a person sees: JSON log lines off a terminal, progress with an ETA, byte offsets of lines."""

from __future__ import annotations

import json
import logging

from teacher_farm.client.inputs import Line, discover, read_inputs
from teacher_farm.client.progress import JsonFormatter, Progress


def read_corpus(path, **kwargs):
    """Every line of one corpus file, as a run reads it."""
    return read_inputs(discover([str(path)]), **kwargs)


def test_json_log_lines_carry_the_message_and_fields():
    record = logging.LogRecord(
        "teacher_farm.progress", logging.INFO, __file__, 1, "progress %s", ("now",), None
    )
    record.fields = {"lines": 3, "tokens": 120}
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "progress now" and entry["level"] == "info"
    assert entry["lines"] == 3 and entry["tokens"] == 120 and entry["time"].endswith(tuple("0123456789"))


def test_progress_off_a_terminal_logs_counts_percent_and_eta(caplog):
    caplog.set_level(logging.INFO, logger="teacher_farm.progress")
    progress = Progress(total_bytes=1000, every_s=0.0)
    progress.advance(lines=2, tokens=50, offset=250)
    progress.advance(lines=1, tokens=25, offset=500)
    progress.close()
    last = caplog.records[-1].fields
    assert last["lines"] == 3 and last["tokens"] == 75 and last["bytes_read"] == 500
    assert last["percent"] == 50.0 and last["eta_s"] >= 0


def test_every_record_knows_how_far_into_the_input_it_ends(tmp_path):
    raw = ['{"text": "ä"}\n', "broken\n", '{"text": "b"}\n']
    path = tmp_path / "in.jsonl"
    path.write_text("".join(raw), encoding="utf-8")
    ends = [r.end for r in read_corpus(path)]
    assert ends == [len(raw[0].encode()), len("".join(raw[:2]).encode()), path.stat().st_size]
    resumed = list(read_corpus(path, skip=lambda n: n < 2))
    assert isinstance(resumed[0], Line) and resumed[0].end == path.stat().st_size
