"""dcapd-admin for the operator (issues 13 and 18): fetch's progress, resuming and
--skip-unknown; put checking its file first; hash-token; status; refresh's changes; expired
collateral counted; unusable paths as one line and exit status 2; a cache's entries listed
and deleted."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import re

import pytest
import requests

from dcapd.admin import main
from dcapd.admin.cache_import import open_services
from dcapd.admin.common import Progress
from dcapd.store import Store
from tests import pki
from tests.conftest import upstream_settings
from tests.servers import running_dcapd
from tests.test_admin import PLATFORM, V4, fetch_args, serve_test_world
from tests.test_migrate import INTEL_DB
from tests.test_pckcert import TCB_CHAIN
from tests.test_platforms import ADMIN, TOKENS
from tests.uploads import intel_upload

UNKNOWN = {
    "qe_id": "AB" * 16,
    "pce_id": "0000",
    "cpu_svn": "",
    "pce_svn": "",
    "enc_ppid": "cd" * 384,
    "platform_manifest": "",
}
KNOWN = dict(UNKNOWN, qe_id=PLATFORM.qeid, enc_ppid=PLATFORM.encrypted_ppid)
# Intel's own upload file: real Intel collateral, every item long past its nextUpdate.
INTEL_ITEMS = 14


@pytest.fixture
def roots(tmp_path, make_config) -> str:
    """Intel's root and the test PKI root (the file make_config writes)."""
    return str(tmp_path / "trusted_roots.pem")


def one_line(err: str) -> str:
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


# --- fetch: a line per platform, the resume announced first, platforms PCS does not know


def test_fetch_progress_resume_and_skip_unknown(tmp_path, fake_pcs, roots, capsys):
    fake = fake_pcs()
    serve_test_world(fake)
    query = {"encrypted_ppid": UNKNOWN["enc_ppid"], "pceid": "0000"}
    fake.add_response("GET", f"{V4}/pckcerts", query, 404, {"Error-Code": "NotFound"})
    platform_list, output = tmp_path / "platform_list.json", tmp_path / "out.json"
    platform_list.write_text(json.dumps([UNKNOWN, KNOWN]))
    argv = fetch_args(fake, roots, platform_list, output)

    # As before: the first platform PCS does not know stops the run.
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"PCK certificates of platform {UNKNOWN['qe_id']}/0000: PCS answered 404" in err
    assert "platform 2/2" not in err

    # --skip-unknown goes on (resuming: announced before anything is fetched); an error
    # after the platforms stops it again.
    fake.fail_with(status=500, paths=f"{V4}/qe/identity")
    assert main(argv + ["--skip-unknown"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == (
        f"resuming from {output}.partial: 0 of 2 platforms done, 3 PCS answers kept "
        "(--restart to fetch everything again)"
    )
    assert err[1] == f"platform 1/2 {UNKNOWN['qe_id']}/0000: PCS does not know it (404); skipped"
    assert err[2] == f"platform 2/2 {PLATFORM.qeid}/0000: 4 certificates (4 so far)"
    assert "QE identity (standard): PCS answered 500" in err[-1]

    fake.clear_fault()
    fake.reset_calls()
    assert main(argv + ["--skip-unknown"]) == 0
    out, err = capsys.readouterr()
    assert err.splitlines()[0].startswith(
        f"resuming from {output}.partial: 2 of 2 platforms done, "
    ), "the unknown platform's 404 was kept too"
    assert not any(c.path.endswith("/pckcerts") for c in fake.calls)
    assert f"{output}: 1 platform, 4 certificates, 1 FMSPC" in out
    assert f"1 platform PCS does not know (404), skipped: {UNKNOWN['qe_id']}/0000" in out
    upload = json.loads(output.read_text())
    assert upload["platforms"] == [KNOWN], "the unknown platform is left out of the file"
    assert [e["qe_id"] for e in upload["collaterals"]["pck_certs"]] == [PLATFORM.qeid]


# --- put: checked as import checks it, before anything is sent; the server's Request-ID


def test_put_checks_the_file_first_and_names_the_reason(tmp_path, fake_pcs, roots, capsys):
    bad = intel_upload()
    bad["collaterals"]["pck_certs"][0]["certs"][0]["tcbm"] = "zz"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    reason = "pck_certs[0].certs[0] needs tcb, tcbm (36 hex) and cert"

    assert (
        main(["import", "-i", str(path), "-C", str(tmp_path / "c"), "--trusted-roots", roots]) == 1
    )
    assert reason in one_line(capsys.readouterr().err)

    pccs = fake_pcs()  # records what it is sent
    put = ["put", "-u", pccs.base, "--token", ADMIN, "-i", str(path), "--trusted-roots", roots]
    assert main(put) == 1
    err = one_line(capsys.readouterr().err)
    assert f"{path}: refused (400): collateral upload: {reason}" in err and "not sent" in err
    assert pccs.calls == [], "nothing sent"

    # Collateral signed by a root the check is not given: named, not sent.
    good = tmp_path / "good.json"
    good.write_text(json.dumps(intel_upload()))
    test_pki_only = tmp_path / "test_root.pem"
    test_pki_only.write_text(pki.root_ca().pem)
    assert main(put[:-1] + [str(test_pki_only), "-i", str(good)]) == 1
    assert "is not a trusted root" in one_line(capsys.readouterr().err)
    assert pccs.calls == []


def test_the_upload_check_writes_nothing(tmp_path, roots):
    services = open_services(str(tmp_path / "cache"), roots, None)
    try:
        services.upload.check(4, intel_upload())
        assert services.store.keys() == []
        services.upload.apply(4, intel_upload())
        assert services.store.keys() != []
    finally:
        services.close()


def test_put_reports_expired_items_and_the_request_id(tmp_path, make_config, roots, capsys):
    good = tmp_path / "intel.json"
    good.write_text(json.dumps(intel_upload()))
    expired = f"{INTEL_ITEMS} collateral items of {INTEL_ITEMS} past nextUpdate"
    config = make_config(cache_mode="OFFLINE", cache_dir=str(tmp_path / "srv"), **TOKENS)
    with running_dcapd(config) as server:
        base = f"http://127.0.0.1:{server.port}"
        assert main(["put", "-u", base, "--token", ADMIN, "-i", str(good)]) == 0
        out = capsys.readouterr().out
        assert f"{good}: {expired} (e.g. tcbinfos[0].sgx_tcbinfo)" in out
        assert "Operation successful." in out

        # Sent unchecked, the server refuses it: its status, text and Request-ID are shown.
        bad = intel_upload()
        bad["collaterals"]["pck_certs"][0]["certs"][0]["tcbm"] = "zz"
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(bad))
        assert main(["put", "-u", base, "--token", ADMIN, "-i", str(path), "--no-check"]) == 1
        err = one_line(capsys.readouterr().err)
        assert re.search(r"the PCCS answered 400 \S.* \(Request-ID [0-9A-Za-z-]+\)$", err), err

    assert (
        main(["import", "-i", str(good), "-C", str(tmp_path / "c"), "--trusted-roots", roots]) == 0
    )
    assert f"{good}: {expired}" in capsys.readouterr().out


# --- hash-token


def test_hash_token_from_a_pipe_and_from_a_terminal(monkeypatch, capsys):
    expected = hashlib.sha512(b"tok").hexdigest()
    monkeypatch.setattr("sys.stdin", io.StringIO("tok\n"))
    assert main(["hash-token"]) == 0
    out, err = capsys.readouterr()
    assert out == expected + "\n", "the newline echo adds is not part of the token"
    assert "one trailing newline removed" in err
    monkeypatch.setattr("sys.stdin", io.StringIO("tok"))  # printf %s tok | ...
    assert main(["hash-token"]) == 0
    assert capsys.readouterr() == (expected + "\n", "")
    monkeypatch.setattr("sys.stdin", io.StringIO("tok\n\n"))  # exactly one newline goes
    assert main(["hash-token"]) == 0
    assert capsys.readouterr().out == hashlib.sha512(b"tok\n").hexdigest() + "\n"

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    prompts = []
    monkeypatch.setattr("sys.stdin", Terminal())
    monkeypatch.setattr("getpass.getpass", lambda prompt: prompts.append(prompt) or "tok")
    assert main(["hash-token"]) == 0
    assert capsys.readouterr() == (expected + "\n", "") and prompts == ["Token: "]
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert main(["hash-token"]) == 1
    assert "empty token" in capsys.readouterr().err


# --- status and refresh against a running dcapd


def _identity(issued: str, next_update: str, tcb_eval: int, identity_id: str = "QE") -> bytes:
    inner = {
        "id": identity_id,
        "version": 2,
        "issueDate": issued,
        "nextUpdate": next_update,
        "tcbEvaluationDataNumber": tcb_eval,
        "miscselect": "00000000",
        "miscselectMask": "FFFFFFFF",
        "attributes": "11000000000000000000000000000000",
        "attributesMask": "FBFFFFFFFFFFFFFF0000000000000000",
        "mrsigner": "AB" * 32,
        "isvprodid": 1,
        "tcbLevels": [
            {"tcb": {"isvsvn": 8}, "tcbDate": "2024-03-13T00:00:00Z", "tcbStatus": "UpToDate"}
        ],
    }
    return pki.make_signed_json("enclaveIdentity", inner)


def _serve_identity(fake, path: str, body: bytes) -> None:
    headers = {"Content-Type": "application/json", "SGX-Enclave-Identity-Issuer-Chain": TCB_CHAIN}
    fake.add_response("GET", path, {"update": "standard"}, 200, headers, body)


def test_status_and_refresh_changes(tmp_path, fake_pcs, make_config, capsys, monkeypatch):
    fake = fake_pcs()
    serve_test_world(fake)
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    iso = lambda moment: moment.strftime("%Y-%m-%dT%H:%M:%SZ")  # noqa: E731
    later = iso(now + dt.timedelta(days=30))
    _serve_identity(fake, f"{V4}/qe/identity", _identity(iso(now), later, 17))
    old = _identity("2024-01-01T00:00:00Z", "2024-02-01T00:00:00Z", 16, "QVE")
    _serve_identity(fake, f"{V4}/qve/identity", old)
    # The token's hash as hash-token prints it is what the server is configured with.
    monkeypatch.setattr("sys.stdin", io.StringIO(ADMIN + "\n"))
    assert main(["hash-token"]) == 0
    admin_hash = capsys.readouterr().out.strip()
    config = make_config(
        cache_mode="LAZY",
        cache_dir=str(tmp_path / "lazy"),
        **upstream_settings(fake),
        **dict(TOKENS, admin_token_sha512=admin_hash),
    )
    with running_dcapd(config) as server:
        base = f"http://127.0.0.1:{server.port}"
        for path, params in [
            (f"{V4}/tcb", {"fmspc": PLATFORM.fmspc}),
            (f"{V4}/qe/identity", {}),
            (f"{V4}/qve/identity", {}),
        ]:
            assert requests.get(base + path, params=params, timeout=10).status_code == 200
        monkeypatch.setenv("DCAPD_ADMIN_TOKEN", ADMIN)

        assert main(["status", "-u", base]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0].startswith("mode LAZY, now ")
        assert "last collateral refresh never" in lines[0]
        assert lines[1].split() == ["KIND", "KEY", "NEXT", "UPDATE", "STATE"]
        table = {line.split()[-3]: line.split() for line in lines[2:5]}
        assert table["identity/qve/4/STANDARD"] == [
            "!",
            "identity",
            "identity/qve/4/STANDARD",
            "2024-02-01T00:00:00Z",
            "expired",
        ]
        assert table["identity/qe/4/STANDARD"] == [
            "identity",
            "identity/qe/4/STANDARD",
            later,
            "fresh",
        ]
        assert table[f"tcb/sgx/4/{PLATFORM.fmspc}/STANDARD"][-1] == "fresh"
        assert lines[5].startswith("3 entries: 1 expired, 0 expiring, 2 fresh, 0 unknown; by kind")
        assert "identity 2" in lines[5] and "tcb 1" in lines[5]
        assert lines[6] == "0 platforms, 0 PCK certificate answers"
        assert lines[7] == "! expired (past nextUpdate)"

        assert main(["status", "-u", base, "--json"]) == 0
        status = json.loads(capsys.readouterr().out)
        assert status["counts"]["entries_by_state"]["expired"] == 1
        assert {e["key"] for e in status["entries"]} == set(table)

        # PCS now has a newer QvE identity: refresh says what it changed.
        new = _identity(iso(now), later, 17, "QVE")
        _serve_identity(fake, f"{V4}/qve/identity", new)
        assert main(["refresh", "-u", base]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[0] == "collateral refreshed: Operation successful."
        # Refresh also caches what Intel's refresh always fetches (the root CA CRL, the
        # TD-QE identity): new entries.
        assert out[1] == "3 cached entries changed:"
        assert out[2] == (
            f"  identity/qve/4/STANDARD: 2024-01-01T00:00:00Z (TCB eval 16) -> "
            f"{iso(now)} (TCB eval 17)"
        )
        assert out[3].startswith("  identity/tdqe/4/STANDARD: new (20")
        assert out[4].startswith("  rootcacrl: new (20")
        assert main(["refresh", "-u", base]) == 0
        assert capsys.readouterr().out.splitlines()[1:] == ["0 cached entries changed"]

        monkeypatch.setenv("DCAPD_ADMIN_TOKEN", "wrong")
        assert main(["status", "-u", base]) == 1
        err = one_line(capsys.readouterr().err)
        assert "refused the admin token (401" in err and "Request-ID" in err


# --- unusable settings and paths: one line naming them, exit status 2


def test_unusable_paths_are_one_line_and_status_2(tmp_path, fake_pcs, roots, capsys):
    upload = tmp_path / "upload.json"
    upload.write_text(json.dumps(intel_upload()))
    bad_ini = tmp_path / "bad.ini"
    bad_ini.write_text("[auth\n")
    cache = str(tmp_path / "cache")
    for argv, named in [
        (["collect", "-d", "/nonexistent"], "-d /nonexistent: No such file or directory"),
        (["import", "-i", str(tmp_path), "-C", cache], f"cannot read {tmp_path}: Is a directory"),
        (["import", "-i", str(upload), "-C", cache, "--config", str(bad_ini)], str(bad_ini)),
        (["import", "-i", str(upload), "-C", str(upload / "x")], f"cache directory {upload}"),
        (["entries", "-C", str(tmp_path / "none")], "is not a dcapd cache directory"),
        (
            ["put", "-u", "http://127.0.0.1:1", "--ca-file", "/nonexistent.pem", "-i", str(upload)],
            "--ca-file /nonexistent.pem: not a readable file",
        ),
        (
            ["fetch", "-c", "--trusted-roots", "/nonexistent.pem", "-o", str(tmp_path / "o")],
            "--trusted-roots",
        ),
        (["collect", "-d", str(tmp_path), "-o", "/nonexistent/list.json"], "/nonexistent"),
    ]:
        if argv[0] == "collect" and argv[2] == str(tmp_path):
            (tmp_path / "a.csv").write_text(f",0000,,,{'ab' * 16},{'cd' * 8}\n")
        assert main(argv) == 2, argv
        err = one_line(capsys.readouterr().err)
        assert err.startswith("dcapd-admin: ") and named in err, (argv, err)


def test_verbose_is_a_flag_and_counts_are_plural(tmp_path, capsys):
    (tmp_path / "a.csv").write_text(f",0000,,,{'ab' * 16},{'cd' * 8}\n")
    listing = str(tmp_path / "l.json")
    assert main(["-v", "collect", "-d", str(tmp_path), "-o", listing]) == 0
    assert main(["collect", "--verbose", "-d", str(tmp_path), "-o", listing]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"{listing}: 1 platform from 1 CSV file"] * 2
    with pytest.raises(SystemExit) as exit_:
        main(["collect", "--verbose=1"])
    assert exit_.value.code == 2
    assert "ignored explicit argument" in capsys.readouterr().err


# --- a cache directory's entries (issue 13)


def test_entries_and_delete_entry(tmp_path, roots, capsys):
    upload = tmp_path / "upload.json"
    upload.write_text(json.dumps(intel_upload()))
    cache = str(tmp_path / "cache")
    assert main(["import", "-i", str(upload), "-C", cache, "--trusted-roots", roots]) == 0
    capsys.readouterr()
    store = Store(cache)
    try:
        keys = sorted(store.keys())
        tcb_key = next(k for k in keys if k.startswith("tcb/"))
        tcb = store.get(tcb_key)
        assert tcb is not None
        platform_key = next(k for k in keys if k.startswith("platform/"))
    finally:
        store.close()

    assert main(["entries", "-C", cache]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["KIND", "SIZE", "NEXT", "UPDATE", "STATE", "KEY"]
    assert [line.split()[-1] for line in lines[1:-1]] == keys
    assert lines[-1] == f"{len(keys)} entries in {cache}"
    row = next(line.split() for line in lines if line.endswith(tcb_key))
    assert row == ["tcb", str(len(tcb.body)), tcb.meta["next_update"], "expired", tcb_key]

    assert main(["entries", "-C", cache, "--prefix", "tcb/"]) == 0
    lines = capsys.readouterr().out.splitlines()
    tcb_keys = [k for k in keys if k.startswith("tcb/")]
    assert [line.split()[-1] for line in lines[1:-1]] == tcb_keys
    assert lines[-1].startswith(f"{len(tcb_keys)} entr")

    assert main(["delete-entry", tcb_key, "-C", cache]) == 0
    assert capsys.readouterr().out.strip() == (
        f"deleted {tcb_key} from {cache} (tcb, {len(tcb.body)} bytes, "
        f"next update {tcb.meta['next_update']})"
    )
    assert main(["delete-entry", tcb_key, "-C", cache]) == 1
    assert f"{tcb_key}: no such entry" in one_line(capsys.readouterr().err)
    assert main(["delete-entry", platform_key, "-C", cache]) == 1
    assert "--force" in one_line(capsys.readouterr().err)
    assert main(["delete-entry", platform_key, "-C", cache, "--force"]) == 0
    assert f"deleted {platform_key}" in capsys.readouterr().out
    store = Store(cache)
    try:
        assert sorted(store.keys()) == [k for k in keys if k not in (tcb_key, platform_key)]
    finally:
        store.close()


def test_migrate_summary_is_printed_once(tmp_path, monkeypatch, capsys):
    for name in [n for n in os.environ if n.startswith("DCAPD_")]:
        monkeypatch.delenv(name)
    db = INTEL_DB
    assert main(["migrate", "-v", str(db), "--cache-dir", str(tmp_path / "c")]) == 0
    out, err = capsys.readouterr()
    assert out.count("registration queue: 1 NEW") == 1 and out.count("skipped: 0") == 1
    assert "registration queue" not in err and "TCB infos:" not in err, err
    assert f"imported {db} (0 rows skipped)" in err, "-v: the log says it is done, no more"


def test_progress_on_a_terminal_is_a_bar_with_announcements():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    tty = Terminal()
    bar = Progress(tty)
    bar.add(2)
    bar.step("platform 1/2, 4 certificates")
    bar.line("platform 1/2 X/0000: 4 certificates (4 so far)")  # the bar says it already
    bar.announce("resuming from out.json.partial")
    bar.close()
    text = tty.getvalue()
    assert "1/2 platform 1/2, 4 certificates" in text and "so far" not in text
    assert "resuming from out.json.partial\n" in text
    assert text.endswith("\r")
