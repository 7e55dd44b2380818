"""The store's contract, on both backends (the diskcache directory and PostgreSQL): bytes
under string keys, prefix listing, all-or-nothing transactions that run one at a time across
processes, locks whose owner is judged by host; and the PostgreSQL schema rules."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from dcapd.backends import StoreUnavailable
from dcapd.backends.disk import DiskBackend
from dcapd.config import ConfigError, load_config
from dcapd.store import Entry, Store, lock_owner, node_id, owner_is_gone
from tests.conftest import BACKENDS


@pytest.fixture(params=BACKENDS)
def stores(request, tmp_path):
    """Opens stores on one cache (two opened = two nodes on one directory or database)."""
    opened: list[Store] = []
    url: list[str] = []

    def open_one() -> Store:
        if request.param == "postgresql" and not url:
            url.append(request.getfixturevalue("pg_url"))
        if request.param == "disk":
            store = Store(backend=DiskBackend(str(tmp_path / "cache")))
        else:
            from dcapd.backends.postgres import PostgresBackend

            store = Store(backend=PostgresBackend(url[0], 4, 3.0))
        opened.append(store)
        return store

    yield open_one
    for store in opened:
        store.close()


def test_entries_round_trip_bytes_exactly(stores):
    store = stores()
    body = bytes(range(256)) * 40 + b"\n\n\x00"
    entry = Entry(body, {"SGX-TCBm": "00" * 18, "X": "a%20b"}, "application/json", {"n": 1})
    store.put("tcb/sgx/4/00906ED50000/STANDARD", entry)
    assert store.get("tcb/sgx/4/00906ED50000/STANDARD") == entry
    assert store.cache.get("tcb/sgx/4/00906ED50000/STANDARD") == entry.to_bytes()
    assert store.get("tcb/sgx/4/00906ED50000/EARLY") is None
    store.put_json("platform/AA/BB", {"fmspc": "00906ED50000"})
    assert store.get_json("platform/AA/BB") == {"fmspc": "00906ED50000"}
    with pytest.raises(TypeError):
        store.backend.set("key", "not bytes")  # type: ignore[arg-type]


def test_keys_by_prefix_pop_and_delete(stores):
    store = stores()
    for key in ("reg/NEW/A", "reg/NEW/B", "reg/NOT_AVAILABLE/A", "regXNEW/C", "reg/NEW%/D"):
        store.put(key, Entry(key.encode()))
    assert store.keys("reg/NEW/") == ["reg/NEW/A", "reg/NEW/B"]
    assert store.keys("reg/NEW%") == ["reg/NEW%/D"]  # % and _ are not wildcards
    assert store.keys("reg_") == []
    assert len(store.keys()) == 5
    assert store.pop("reg/NEW/A") == Entry(b"reg/NEW/A")
    assert store.pop("reg/NEW/A") is None
    store.delete("reg/NEW/B")
    store.delete("reg/NEW/B")  # deleting a missing key is no error
    assert store.keys("reg/NEW/") == []


def test_transactions_are_all_or_nothing_and_nest(stores):
    store = stores()
    store.put("a", Entry(b"old"))
    with pytest.raises(RuntimeError):
        with store.transaction():
            store.put("a", Entry(b"new"))
            store.put("b", Entry(b"new"))
            assert store.get("a") == Entry(b"new")  # a transaction reads its own writes
            raise RuntimeError("fails half-way")
    assert store.get("a") == Entry(b"old") and store.get("b") is None
    with store.transaction():
        store.put("a", Entry(b"new"))
        with store.transaction():
            store.put("b", Entry(b"new"))
    assert store.get("a") == store.get("b") == Entry(b"new")


def test_reads_see_each_commit_at_once_and_never_an_uncommitted_write(stores):
    """A hit reads what was last committed by anyone (another node, another thread): never
    a copy kept from before, never another thread's transaction in progress."""
    reader, writer = stores(), stores()
    key = "pckcert/AA/BB/CC/DD"
    assert reader.get(key) is None
    for n in range(3):
        writer.put(key, Entry(b"v%d" % n))
        assert reader.get(key) == Entry(b"v%d" % n)
    in_transaction, go_on = threading.Event(), threading.Event()

    def write_in_a_transaction() -> None:
        with writer.transaction():
            writer.put(key, Entry(b"new"))
            assert writer.get(key) == Entry(b"new")  # its own write, in its transaction
            in_transaction.set()
            go_on.wait(10)

    thread = threading.Thread(target=write_in_a_transaction)
    thread.start()
    try:
        assert in_transaction.wait(10)
        assert reader.get(key) == Entry(b"v2")
        assert writer.get(key) == Entry(b"v2")  # another thread of the same opener
    finally:
        go_on.set()
        thread.join()
    assert reader.get(key) == writer.get(key) == Entry(b"new")


def test_transactions_of_two_openers_run_one_at_a_time(stores):
    """Read-modify-write in a transaction is never interleaved, whichever node runs it."""
    nodes = [stores(), stores()]
    nodes[0].put_json("counter", {"n": 0})

    def add(store: Store) -> None:
        for _ in range(25):
            with store.transaction():
                value = store.get_json("counter")["n"]
                time.sleep(0.001)
                store.put_json("counter", {"n": value + 1})

    threads = [threading.Thread(target=add, args=(node,)) for node in nodes for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert nodes[1].get_json("counter") == {"n": 100}


def test_a_lock_is_held_once_and_expires(stores):
    first, second = stores(), stores()
    now = time.time()
    assert first.try_lock("refresh", "node-a:1:x", 60, now)
    assert not second.try_lock("refresh", "node-b:2:y", 60, now)
    assert first.try_lock("refresh", "node-a:1:x", 60, now), "the owner may renew"
    assert second.try_lock("refresh", "node-b:2:y", 60, now + 61), "expired: a dead node's"
    second.unlock("refresh", "node-a:1:x")  # not the owner: no effect
    assert not first.try_lock("refresh", "node-a:1:x", 60, now + 62)
    second.unlock("refresh", "node-b:2:y")
    assert first.try_lock("refresh", "node-a:1:x", 60, now + 62)


def test_lock_owner_liveness_is_judged_on_its_own_host_only():
    owner = lock_owner()
    assert owner.startswith(node_id() + ":") and node_id().startswith(socket.gethostname())
    assert not owner_is_gone(owner), "this process runs"
    unused_pid = 2**22 + 12345  # above pid_max's default: no such process here
    assert owner_is_gone(f"{node_id()}:{unused_pid}:abc")
    # The same PID on another node (or in another container of this host name) says nothing:
    # that lock waits for its lease.
    assert not owner_is_gone(f"other-node.example:{unused_pid}:abc")
    assert not owner_is_gone(f"{socket.gethostname()}/1:{unused_pid}:abc")


# --- PostgreSQL only -------------------------------------------------------------------------


def test_schema_is_created_once_by_nodes_starting_together(pg_url):
    from dcapd.backends.postgres import PostgresBackend

    backends: list = []
    errors: list = []
    barrier = threading.Barrier(6)

    def start() -> None:
        barrier.wait()
        try:
            backends.append(PostgresBackend(pg_url, 2, 5.0))
        except Exception as exc:  # pragma: no cover - the failure this test looks for
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert errors == []
        assert all(backend.schema_ready for backend in backends)
        backends[0].set("k", b"v")
        assert backends[5].get("k") == b"v"
    finally:
        for backend in backends:
            backend.close()


def test_a_newer_schema_refuses_to_start_with_one_line(pg_url, postgres_server):
    from dcapd.backends.postgres import PostgresBackend

    PostgresBackend(pg_url, 1, 3.0).close()
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("UPDATE dcapd_meta SET value = '99' WHERE name = 'schema_version'")
    with pytest.raises(ConfigError) as caught:
        PostgresBackend(pg_url, 1, 3.0)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("[cache] url / DCAPD_CACHE_URL: ")
    assert "schema version 99, newer than this dcapd knows (1)" in message


def test_prefix_listing_uses_the_index(pg_url):
    from dcapd.backends.postgres import PostgresBackend

    backend = PostgresBackend(pg_url, 1, 3.0)
    with backend.pool.connection() as conn:
        conn.execute("SET enable_seqscan = off")
        plan = "\n".join(
            row[0]
            for row in conn.execute(
                "EXPLAIN SELECT key FROM dcapd_entries WHERE key LIKE %s", ("reg/NEW/%",)
            )
        )
        conn.execute("RESET enable_seqscan")
    backend.close()
    assert "Index" in plan and "dcapd_entries_pkey" in plan, plan


def test_cache_dir_and_url_together_are_a_configuration_error():
    with pytest.raises(ConfigError) as caught:
        load_config(
            {"cache_dir": "/var/cache/dcapd", "cache_url": "postgresql://dcapd@db/dcapd"},
            environ={},
        )
    assert "[cache] dir / DCAPD_CACHE_DIR and [cache] url / DCAPD_CACHE_URL" in str(caught.value)
    # The directory's default does not count as set.
    config = load_config({"cache_url": "postgresql://dcapd@db/dcapd"}, environ={})
    assert config.cache_dir == "" and config.cache_url == "postgresql://dcapd@db/dcapd"
    with pytest.raises(ConfigError) as caught:
        load_config({"cache_url": "mysql://root:hunter2@db/x"}, environ={})
    assert "hunter2" not in str(caught.value)


def test_the_password_is_masked_and_never_in_errors(postgres_server):
    from dcapd.backends.postgres import PostgresBackend, mask_url

    assert (
        mask_url("postgresql://dcapd:s3cret@db.example:5432/dcapd?sslmode=verify-full")
        == "postgresql://dcapd:***@db.example:5432/dcapd?sslmode=verify-full"
    )
    assert mask_url("postgresql://db/dcapd?user=u&password=s3cret&sslmode=require") == (
        "postgresql://db/dcapd?user=u&password=***&sslmode=require"
    )
    with pytest.raises(ConfigError) as caught:
        PostgresBackend("postgresql://dcapd:s3cret@db/dcapd?bogus=1", 1, 1.0)
    assert "s3cret" not in str(caught.value)
    config = load_config({"cache_url": "postgresql://dcapd:s3cret@db/dcapd"}, environ={})
    assert "s3cret" not in repr(config)
    # Refused credentials: the error names the database but never the password.
    url = f"postgresql://nobody:s3cret@127.0.0.1:{postgres_server.port}/postgres?sslmode=disable"
    backend = PostgresBackend(url, 1, 0.5)  # starts: the database may come later
    try:
        with pytest.raises(StoreUnavailable) as caught:
            backend.get("k")
        assert "s3cret" not in str(caught.value)
        assert f"database postgres on 127.0.0.1:{postgres_server.port}" in str(caught.value)
    finally:
        backend.close()
