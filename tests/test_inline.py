"""Answers in the front's own thread (dcapd.inline, dcapd.direct): a cache hit is answered
where the request was read, anything that may wait is run again in a pool thread, and
neither is visible to a client except in time."""

from __future__ import annotations

import os
import time

import pytest
import requests

from dcapd.app import create_app
from dcapd.inline import MustWait, inline
from dcapd.store import Entry
from tests.test_graceful_stop import QE, SCENARIO, Running, wait_for

pytestmark = [
    pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning"),
    pytest.mark.skipif(os.name == "nt", reason="shares test_graceful_stop's POSIX helpers"),
]

SLOW = "/sgx/certification/v4/pckcrl?ca=platform"


@pytest.fixture
def roots(make_config) -> str:
    return make_config().trusted_roots


def test_every_wait_point_refuses_inline_and_nothing_else_does(make_config):
    app = create_app(make_config(cache_mode="LAZY"))
    store = app.services.store
    try:
        assert app.answers_inline, "a cache directory: reads never wait"
        store.put("probe/a", Entry(body=b"x", meta={}))
        with inline():
            assert store.get("probe/a").body == b"x"  # a read goes ahead
            for attempt in (
                lambda: store.put("probe/b", Entry(body=b"y", meta={})),
                lambda: store.delete("probe/a"),
                lambda: store.pop("probe/a"),
                lambda: store.keys("probe/"),
                lambda: store.try_lock("probe", "me", 5, time.time()),
                lambda: app.services.upstream.get_root_ca_crl(),
            ):
                with pytest.raises(MustWait):
                    attempt()
        assert store.get("probe/a").body == b"x" and store.get("probe/b") is None
        assert store.keys("probe/") == ["probe/a"]  # outside: as before
    finally:
        store.close()
        app.services.upstream.close()


def test_a_slow_fill_holds_up_no_hit_and_each_request_is_logged_once(tmp_path, fake_pcs, roots):
    fake = fake_pcs(SCENARIO)
    dcapd = Running(tmp_path, fake, roots, "auto", grace=1)
    try:
        with requests.Session() as session:
            session.verify = False
            session.trust_env = False
            assert session.get(dcapd.url + QE, timeout=10).status_code == 200  # filled
            fake.fail_with(delay=3.0, paths="/pckcrl")
            slow = dcapd.get(SLOW)
            wait_for(lambda: fake.count("/pckcrl") >= 1, 10, "the fill never started")
            for _ in range(5):  # meanwhile, hits (a new connection each) are answered
                reply = requests.get(dcapd.url + QE, timeout=10, verify=False)
                assert reply.status_code == 200
            # All five answered while the fill still waited on PCS: none was held up by it.
            # (No clock bound per hit: that is the bench's business, and flaky under load.)
            assert "finished" not in slow, "the hits waited for the fill"
        slow["thread"].join(10)
        assert slow.get("status") == 200, slow
        assert fake.count("/pckcrl") == 1, "one call: the fill, not one per attempt"
        log = dcapd.text()
        assert log.count("GET /sgx/certification/v4/pckcrl 200") == 1, log[-3000:]
        assert log.count("GET /sgx/certification/v4/qe/identity 200") == 6
        assert log.count("cache=hit") == 5 and "Traceback" not in log
    finally:
        dcapd.close()
