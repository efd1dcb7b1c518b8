"""The JSON log line: the standard fields, ``extra=`` fields kept, and the attributes Ray's and vLLM's record
factories stamp on every record left out."""

from __future__ import annotations

import json
import logging

from service.logging import JSONFormatter


def test_a_json_line_keeps_extra_fields_and_drops_ray_and_vllm_stamps():
    record = logging.LogRecord("service.runtime", logging.INFO, __file__, 1, "ready: %s", ("v1",), None)
    record.version = "v1"  # an extra= field
    record._ray_timestamp_ns = 1796578655894682533  # what ray's record factory adds once imported
    record.vllm_process_name = "MainProcess"  # and vLLM's
    line = json.loads(JSONFormatter().format(record))
    assert line["msg"] == "ready: v1" and line["version"] == "v1" and line["level"] == "INFO"
    assert "_ray_timestamp_ns" not in line and "vllm_process_name" not in line
