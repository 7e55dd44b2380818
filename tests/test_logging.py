"""One log line per request: method, path (never the query), status, duration, cache outcome."""

from __future__ import annotations

import logging
import re

from tests import pki
from tests.test_pckcert import CASES, PCKCERT, query, raw_tcb, serve_platform


def request_lines(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "dcapd.http" and re.match(r"^[A-Z]+ /", r.getMessage())
    ]


def test_request_lines_say_how_the_cache_answered(fake_pcs, make_client, caplog):
    fake = fake_pcs("2025-05-27_intel-pcs-recording")
    serve_platform(fake)
    client = make_client(fake)
    caplog.set_level(logging.INFO, logger="dcapd")
    client.simulate_get("/sgx/certification/v4/qe/identity")
    client.simulate_get("/sgx/certification/v4/qe/identity")
    client.simulate_get(PCKCERT, params=query(*raw_tcb(*CASES[0][:2])))
    client.simulate_get(PCKCERT, params=query(*raw_tcb(*CASES[1][:2])))
    client.simulate_get("/nowhere")
    lines = request_lines(caplog)
    assert len(lines) == 5
    pattern = r"^GET {} {} \d+\.\dms cache={} client=\S+$"
    assert re.match(pattern.format("/sgx/certification/v4/qe/identity", 200, "upstream"), lines[0])
    assert re.match(pattern.format("/sgx/certification/v4/qe/identity", 200, "hit"), lines[1])
    assert re.match(pattern.format(PCKCERT, 200, "upstream"), lines[2])
    assert re.match(pattern.format(PCKCERT, 200, "selected"), lines[3])
    assert re.match(pattern.format("/nowhere", 404, "-"), lines[4])
    assert pki.default_platform().encrypted_ppid.lower() not in caplog.text.lower()


def test_log_format_and_level_are_configurable(capsys):
    import json as jsonlib

    from dcapd.logs import configure_logging

    logger = logging.getLogger("dcapd.test")
    try:
        configure_logging("warning", fmt="json")
        logger.info("not shown")
        logger.warning("shown %s", 1)
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1
        record = jsonlib.loads(lines[0])
        assert record["level"] == "WARNING" and record["message"] == "shown 1"
        assert "request_id" in record and record["logger"] == "dcapd.test"
        configure_logging("error", verbose=True)
        logger.debug("debug %s", "shown")
        assert re.search(
            r"DEBUG dcapd\.test \[[-0-9a-f]+\] debug shown$", capsys.readouterr().err.strip()
        )
    finally:
        root = logging.getLogger("dcapd")
        root.handlers[:] = []
        root.propagate = True
        root.setLevel(logging.NOTSET)


def test_the_access_line_is_the_line_logger_info_writes_and_yields_to_other_set_ups(monkeypatch):
    """dcapd.logs.AccessLine writes the default text line itself: byte for byte what
    logger.info writes at the same instant. With a handler added (an embedding app, a test's
    caplog) or JSON lines, the record goes through logging, its ``client`` field included."""
    import io
    import json as jsonlib
    import time

    from dcapd.logs import AccessLine, configure_logging, request_id_var

    logger = logging.getLogger("dcapd.http")
    access = AccessLine(logger)
    fmt, args = "%s %s %s %.1fms cache=%s client=%s", ("GET", "/x", 200, 0.3, "hit", "192.0.2.1")
    now = 1_764_000_000.25  # LogRecord reads time.time (3.11) or time.time_ns (3.12+)
    monkeypatch.setattr(time, "time", lambda: now)
    monkeypatch.setattr(time, "time_ns", lambda: int(now * 1e9))
    token = request_id_var.set("0123abcd")
    added = logging.Handler()
    records: list[logging.LogRecord] = []
    added.emit = records.append  # type: ignore[method-assign]
    try:
        configure_logging()
        stream = io.StringIO()
        logging.getLogger("dcapd").handlers[0].setStream(stream)  # type: ignore[attr-defined]
        access(fmt, args, "192.0.2.1")
        logger.info(fmt, *args, extra={"client": "192.0.2.1"})
        ours, logging_s = stream.getvalue().splitlines()
        assert ours == logging_s
        assert ours.endswith(
            " INFO dcapd.http [0123abcd] GET /x 200 0.3ms cache=hit client=192.0.2.1"
        )

        logger.addHandler(added)
        access(fmt, args, "192.0.2.1")
        assert [r.getMessage() for r in records] == [ours.split("] ", 1)[1]]
        assert records[0].client == "192.0.2.1"  # type: ignore[attr-defined]
        logger.removeHandler(added)

        configure_logging(fmt="json")
        stream = io.StringIO()
        logging.getLogger("dcapd").handlers[0].setStream(stream)  # type: ignore[attr-defined]
        access(fmt, args, "192.0.2.1")
        line = jsonlib.loads(stream.getvalue())
        assert line["client"] == "192.0.2.1" and line["request_id"] == "0123abcd"

        configure_logging("warning")
        stream = io.StringIO()
        logging.getLogger("dcapd").handlers[0].setStream(stream)  # type: ignore[attr-defined]
        access(fmt, args, "192.0.2.1")
        assert stream.getvalue() == ""
    finally:
        request_id_var.reset(token)
        logger.removeHandler(added)
        root = logging.getLogger("dcapd")
        root.handlers[:] = []
        root.propagate = True
        root.setLevel(logging.NOTSET)
