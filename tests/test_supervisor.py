"""``[server] workers`` (issue 15 point 2): the real ``dcapd`` command with two worker
processes on one port and one cache (Linux, SO_REUSEPORT).

Both workers answer (which process holds each accepted connection is read from /proc), each on
its own CPU, with the one kept TLS certificate; a killed worker is replaced and logged; SIGTERM
to the supervisor stops all and exits 0; the refresh schedule runs once between them.
"""

from __future__ import annotations

import http.client
import os
import re
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dcapd.cli import check_tls_files
from dcapd.schedule import RefreshScheduler
from dcapd.supervisor import WorkerRole, as_worker, shared_certificate
from tests.conftest import INTEL_ROOT_CDP
from tests.servers import dcapd_environment

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="worker processes need Linux's SO_REUSEPORT"
)

SCENARIO = "2025-05-27_intel-pcs-recording"
START = re.compile(r"supervisor: 2 workers on 127\.0\.0\.1 port (\d+), pids (\d+), (\d+)")


class Supervised:
    """``python -m dcapd`` with two workers on 127.0.0.1:0; its log in a file."""

    def __init__(self, tmp_path: Path, args: list[str], **env: str):
        environment = dcapd_environment(
            DCAPD_LISTEN="127.0.0.1:0",
            DCAPD_CACHE_DIR=str(tmp_path / "cache"),
            DCAPD_GRACE_PERIOD="2",
            DCAPD_REFRESH_SCHEDULE="0 0 0 1 1 *",
            DCAPD_UPSTREAM_RETRIES="0",
            NO_PROXY="127.0.0.1",
            no_proxy="127.0.0.1",
        )
        environment.update(env)
        self.log = tmp_path / "dcapd.log"
        with open(self.log, "wb") as sink:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "dcapd", *args],
                env=environment,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        start = self.wait_for(START)
        self.port = int(start.group(1))
        self.pids = [int(start.group(2)), int(start.group(3))]
        self.wait_for(lambda text: text.count("dcapd listening on") >= 2 or None)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern, timeout: float = 30):
        """The first match of *pattern* (a regex, or a function of the log) once it is there."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.text()
            found = pattern(text) if callable(pattern) else pattern.search(text)
            if found:
                return found
            assert self.process.poll() is None, f"dcapd exited: {text[-2000:]}"
            assert time.monotonic() < deadline, text[-2000:]
            time.sleep(0.05)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        for pid in self.pids:  # workers left behind by a failed test
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def serving_pid(sock, server_port: int, pids: list[int]) -> int | None:
    """Which of *pids* holds the server side of the client connection *sock* (from /proc)."""
    client_port = sock.getsockname()[1]
    local, remote = f"0100007F:{server_port:04X}", f"0100007F:{client_port:04X}"
    with open("/proc/net/tcp") as table:
        inodes = [
            fields[9]
            for fields in (line.split() for line in table.readlines()[1:])
            if fields[1] == local and fields[2] == remote
        ]
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") in {f"socket:[{i}]" for i in inodes}:
                    return pid
        except FileNotFoundError:  # an fd closed meanwhile, or the process gone
            continue
    return None


def https_get(port: int, path: str, pids: list[int]) -> tuple[int, bytes, int | None]:
    """(status, the server's certificate, the pid that served it) for one new connection."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
    try:
        connection.request("GET", path)
        reply = connection.getresponse()
        reply.read()
        sock = connection.sock
        assert sock is not None
        return reply.status, sock.getpeercert(binary_form=True), serving_pid(sock, port, pids)
    finally:
        connection.close()


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_two_workers_answer_refresh_once_a_killed_one_is_replaced_sigterm_stops_all(
    tmp_path, fake_pcs, make_client, make_config
):
    """One run of the command for all of it (each start costs three Python processes)."""
    fake = fake_pcs(SCENARIO)
    # A cache holding collateral past its nextUpdate: a scheduler refreshes at its start.
    client = make_client(fake)
    tcb = client.simulate_get("/sgx/certification/v4/tcb", params={"fmspc": "00906ED50000"})
    assert tcb.status_code == 200
    assert client.simulate_get("/sgx/certification/v4/qe/identity").status_code == 200
    fake.reset_calls()
    dcapd = Supervised(
        tmp_path, ["--workers", "2"], DCAPD_TLS="auto", DCAPD_CACHE_MODE="LAZY",
        DCAPD_TRUSTED_ROOTS=make_config().trusted_roots, DCAPD_PCS_URL=fake.pcs_url,
        DCAPD_URL_MAP=fake.url_map, DCAPD_ROOTCA_CRL_URL=INTEL_ROOT_CDP,
    )  # fmt: skip
    listening = time.monotonic()
    try:
        allowed = sorted(os.sched_getaffinity(0))
        if len(allowed) > 1:  # cpu_affinity = auto: each worker on its own CPU
            assert [os.sched_getaffinity(pid) for pid in dcapd.pids] == [
                {allowed[0]},
                {allowed[1]},
            ]
        kept_der = ssl.PEM_cert_to_DER_cert((tmp_path / "cache" / "tls" / "dcapd.crt").read_text())

        def serve_until_seen(pids: list[int], wanted: set[int]) -> None:
            served: set[int | None] = set()
            for _ in range(200):
                status, certificate, pid = https_get(dcapd.port, "/healthz", pids)
                assert status == 200
                assert certificate == kept_der, "every worker presents the one kept certificate"
                served.add(pid)
                if wanted <= served:
                    break
            assert served - {None} <= set(pids) and wanted <= served, (served, pids)

        serve_until_seen(dcapd.pids, set(dcapd.pids))

        # One refresh between the two workers, each of whose schedulers would be due.
        done = re.compile(r"scheduled refresh \(.*\) (done elsewhere|done)\n")
        dcapd.wait_for(done)
        # Long enough for every worker's scheduler to have made its check at start.
        time.sleep(max(0.0, listening + RefreshScheduler.STARTUP_DELAY + 0.5 - time.monotonic()))
        assert [m.group(1) for m in done.finditer(dcapd.text())] == ["done"]
        calls = [(c.path, sorted(c.query.items())) for c in fake.calls]
        assert fake.count("/sgx/certification/v4/tcb") == 1
        assert len(calls) == len({repr(call) for call in calls}), "an entry fetched twice"

        killed = dcapd.pids[1]
        os.kill(killed, signal.SIGKILL)
        restarted = dcapd.wait_for(
            re.compile(
                rf"worker 1 \(pid {killed}\) exited with signal SIGKILL after [\d.]+ s; "
                r"restarting it in [\d.]+ s\n.*worker 1 restarted \(pid (\d+)\)",
                re.S,
            )
        )
        new = int(restarted.group(1))
        assert new != killed and alive(new)
        dcapd.wait_for(lambda text: text.count("dcapd listening on") >= 3 or None)
        dcapd.pids.append(new)
        serve_until_seen([dcapd.pids[0], new], {new})

        dcapd.process.send_signal(signal.SIGTERM)
        assert dcapd.process.wait(20) == 0, dcapd.text()[-2000:]
        assert not [pid for pid in (dcapd.pids[0], new) if alive(pid)]
        text = dcapd.text()
        assert "SIGTERM received: stopping 2 worker(s)" in text
        assert text.count("SIGTERM received: shutting down") == 2
        assert "all workers stopped" in text and "Traceback" not in text
    finally:
        dcapd.close()


def test_on_postgresql_the_generated_certificate_is_shared_in_memory(make_config):
    config = make_config(tls="auto", cache_dir="", cache_url="postgresql://dcapd@127.0.0.1:9/dcapd")
    path, fd = shared_certificate(config)
    try:
        assert fd is not None and path == f"/proc/self/fd/{fd}"
        worker = as_worker(config, WorkerRole(0, 4711, path))
        assert (worker.cert_file, worker.key_file, worker.listen) == (
            path,
            path,
            ("127.0.0.1", 4711),
        )
        check_tls_files(worker)  # a certificate and its key, usable by the TLS front
        # What a worker started with this fd inherited reads under the same name.
        script = f"import sys; sys.stdout.write(open({path!r}).read())"
        seen = subprocess.run(
            [sys.executable, "-c", script], pass_fds=(fd,), capture_output=True, check=True
        ).stdout
        assert seen == Path(path).read_bytes() and b"PRIVATE KEY" in seen
    finally:
        if fd is not None:
            os.close(fd)
