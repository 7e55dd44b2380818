"""The load of ``scripts/bench.py``: client threads in a few processes, a minimal HTTP/1.1 client.

Two ways to connect:

* ``keepalive``: one persistent connection per client thread (wrk's way);
* ``newconn``: a new connection per request, what QCNL does: connect, TLS handshake, one GET
  with ``Connection: close``, read the answer, close. The client offers TLS session resumption
  (the session of its previous connection, ``session=``) unless told not to, and counts the
  handshakes the server resumed (``session_reused``).
"""

from __future__ import annotations

import os
import socket
import ssl
import threading
import time
from array import array
from types import SimpleNamespace
from typing import Any

from bench_data import Mix
from bench_servers import tree_pids, tree_stats, unverified_context


class Connection:
    """One client connection; ``get`` sends a GET and reads the whole answer."""

    def __init__(
        self,
        host: str,
        port: int,
        ctx: ssl.SSLContext | None,
        session: ssl.SSLSession | None = None,
    ):
        sock = socket.create_connection((host, port), timeout=30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if ctx is not None:
            sock = ctx.wrap_socket(sock, session=session)
        self.sock = sock
        self.host = f"{host}:{port}".encode()
        self.buffer = b""

    def get(self, target: str, close: bool = False) -> int:
        """One GET; returns the status code after reading the whole body."""
        self.sock.sendall(
            b"GET "
            + target.encode()
            + b" HTTP/1.1\r\nHost: "
            + self.host
            + b"\r\nUser-Agent: dcapd-bench\r\nAccept: */*\r\n"
            + (b"Connection: close\r\n\r\n" if close else b"\r\n")
        )
        buffer = self.buffer
        end = buffer.find(b"\r\n\r\n")
        while end < 0:
            chunk = self.sock.recv(262144)
            if not chunk:
                raise ConnectionError("server closed the connection")
            buffer += chunk
            end = buffer.find(b"\r\n\r\n")
        head = buffer[:end].lower()
        at = head.find(b"\r\ncontent-length:")
        if at < 0:
            raise ConnectionError("response without Content-Length")
        eol = head.find(b"\r\n", at + 2)
        length = int(head[at + 17 : eol if eol > 0 else len(head)])
        total = end + 4 + length
        while len(buffer) < total:
            chunk = self.sock.recv(262144)
            if not chunk:
                raise ConnectionError("server closed the connection")
            buffer += chunk
        self.buffer = buffer[total:]
        return int(head[9:12])

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class NewConnections:
    """A client that opens a new connection for each request (``newconn``)."""

    def __init__(self, host: str, port: int, ctx: ssl.SSLContext | None, resume: bool):
        self.host, self.port, self.ctx, self.resume = host, port, ctx, resume
        self.session: ssl.SSLSession | None = None
        self.handshakes = self.reused = 0

    def get(self, target: str) -> int:
        conn = Connection(self.host, self.port, self.ctx, self.session if self.resume else None)
        try:
            status = conn.get(target, close=True)
            if self.ctx is not None:
                sock = conn.sock
                assert isinstance(sock, ssl.SSLSocket)
                self.handshakes += 1
                self.reused += sock.session_reused
                if self.resume:  # TLS 1.3: the ticket came after the handshake, read by now
                    self.session = sock.session
            return status
        finally:
            conn.close()

    def close(self) -> None:
        pass


def client_process(
    host: str,
    port: int,
    tls: bool,
    spec: dict,
    weights: tuple,
    mode: str,
    resume: bool,
    n_threads: int,
    seed: int,
    warmup: float,
    duration: float,
    interval: float,
    cpus: list,
    ready,
    go,
    results,
) -> None:
    """Runs in a client process: ``n_threads`` clients; reports latencies and CPU time.

    ``interval`` 0: each client sends its next request as soon as it has the answer (closed
    loop). Else each sends one request every ``interval`` seconds, and a request's latency
    counts from when it was due (no coordinated omission)."""
    outcome: dict = {
        "latencies": b"",
        "errors": {},
        "failed": None,
        "cpu_s": 0.0,
        "handshakes": 0,
        "reused": 0,
    }
    if cpus:
        os.sched_setaffinity(0, set(cpus))
    ctx = unverified_context() if tls else None
    clients: list = []
    mixes = []
    try:
        for i in range(n_threads):
            if mode == "newconn":
                client = NewConnections(host, port, ctx, resume)
                status = client.get(Mix(spec, seed, weights).next())
            else:
                client = Connection(host, port, ctx)
                status = client.get(Mix(spec, seed, weights).next())
            if status != 200:  # handshake and one request before the clock starts
                raise RuntimeError(f"first request answered {status}")
            clients.append(client)
            mixes.append(Mix(spec, seed * 1000 + i, weights))
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        outcome["failed"] = f"{type(exc).__name__}: {exc}"
    ready.put(seed)
    go.wait()
    if outcome["failed"]:
        results.put(outcome)
        return
    begin = time.perf_counter() + warmup
    stop = begin + duration
    per_thread = [array("d") for _ in clients]
    errors: list[dict] = [{} for _ in clients]
    for client in clients:
        if isinstance(client, NewConnections):
            client.handshakes = client.reused = 0  # counted from the warm-up on

    def run(client, mix: Mix, latencies: array, errs: dict) -> None:
        perf = time.perf_counter
        due = perf() + mix.rng.random() * interval  # spread the clients' first requests
        try:
            while True:
                target = mix.next()
                if interval:
                    wait = due - perf()
                    if wait > 0:
                        time.sleep(wait)
                    t0, due = due, due + interval
                else:
                    t0 = perf()
                if t0 >= stop:
                    return
                status = client.get(target)
                if t0 >= begin:
                    latencies.append(perf() - t0)
                    if status != 200:
                        errs[status] = errs.get(status, 0) + 1
        except Exception as exc:  # noqa: BLE001
            errs[f"{type(exc).__name__}"] = errs.get(f"{type(exc).__name__}", 0) + 1

    threads = [
        threading.Thread(target=run, args=args, daemon=True)
        for args in zip(clients, mixes, per_thread, errors)
    ]
    for thread in threads:
        thread.start()
    time.sleep(max(0.0, begin - time.perf_counter()))
    cpu0 = time.process_time()
    time.sleep(max(0.0, stop - time.perf_counter()))
    cpu1 = time.process_time()
    for thread in threads:
        thread.join(30)
    for client in clients:
        client.close()
    merged = array("d")
    for latencies in per_thread:
        merged.extend(latencies)
    for errs in errors:
        for key, count in errs.items():
            outcome["errors"][str(key)] = outcome["errors"].get(str(key), 0) + count
    outcome["latencies"] = merged.tobytes()
    outcome["cpu_s"] = cpu1 - cpu0
    for client in clients:
        if isinstance(client, NewConnections):
            outcome["handshakes"] += client.handshakes
            outcome["reused"] += client.reused
    results.put(outcome)


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat (0, 0 elsewhere)."""
    try:
        with open("/proc/stat") as handle:
            fields = [int(v) for v in handle.readline().split()[1:]]
    except OSError:
        return 0.0, 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    total = sum(fields[:8])
    return float(total - idle), float(total)


def process_ticks(exclude: set) -> dict:
    """CPU clock ticks of every process but ``exclude``, from /proc (empty elsewhere)."""
    ticks = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return ticks
    for name in names:
        if not name.isdigit() or int(name) in exclude:
            continue
        try:
            with open(f"/proc/{name}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        ticks[name] = int(fields[11]) + int(fields[12])
    return ticks


def others_cores(before: dict, after: dict, seconds: float) -> float:
    """Cores used by other processes (other developers' test runs...) during the window."""
    if not after:
        return float("nan")
    used = sum(t - before.get(pid, 0) for pid, t in after.items())
    return used / os.sysconf("SC_CLK_TCK") / seconds if hasattr(os, "sysconf") else float("nan")


def percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, int(round(q * len(ordered))) - 1))]


def run_load(server, spec: dict, args, weights: tuple, mode: str, client_cpus: list) -> dict:
    """Drive ``server`` (``host``, ``port``, ``tls``, ``pid``) with ``args.clients`` clients for
    ``args.duration`` seconds after ``args.warmup``; the figures of that window."""
    import multiprocessing
    import queue

    ctx: Any = multiprocessing.get_context("spawn")
    in_process = args.client_procs == 0  # quick checks: no process to spawn
    if in_process:  # threads of this process (their CPU: this whole process's)
        ctx = SimpleNamespace(Queue=queue.Queue, Event=threading.Event, Process=threading.Thread)
    procs = max(1, min(args.client_procs, args.clients))
    shares = [args.clients // procs + (1 if i < args.clients % procs else 0) for i in range(procs)]
    ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    client_spec = {k: v for k, v in spec.items() if k != "answers"}
    workers = [
        ctx.Process(
            target=client_process,
            daemon=True,
            args=(
                server.host,
                server.port,
                server.tls,
                client_spec,
                weights,
                mode,
                not args.no_resumption,
                share,
                seed + 1,
                args.warmup,
                args.duration,
                args.clients / args.rate if args.rate else 0.0,
                client_cpus,
                ready,
                go,
                results,
            ),
        )
        for seed, share in enumerate(shares)
    ]
    for worker in workers:
        worker.start()
    try:
        for _ in workers:
            ready.get(timeout=120)
        server_pids = set(tree_pids(server.pid)) if server.pid and os.path.isdir("/proc") else set()
        ours = {os.getpid()} | server_pids | {getattr(w, "pid", 0) for w in workers}
        go.set()
        started = time.perf_counter()
        time.sleep(args.warmup)
        before, machine_before, others_before = (
            tree_stats(server.pid),
            machine_cpu(),
            process_ticks(ours),
        )
        time.sleep(max(0.0, started + args.warmup + args.duration - time.perf_counter()))
        after, machine_after, others_after = (
            tree_stats(server.pid),
            machine_cpu(),
            process_ticks(ours),
        )
        outcomes = [results.get(timeout=120) for _ in workers]
    finally:
        for worker in workers:
            worker.join(10)
            if worker.is_alive() and not in_process:
                worker.terminate()
    failed = [o["failed"] for o in outcomes if o["failed"]]
    if failed:
        raise SystemExit(f"bench: clients could not start: {failed[0]}\n{server.log_tail()}")
    latencies = array("d")
    errors: dict[str, int] = {}
    for outcome in outcomes:
        latencies.frombytes(outcome["latencies"])
        for key, count in outcome["errors"].items():
            errors[key] = errors.get(key, 0) + count
    ordered = sorted(latencies)
    n = len(ordered)
    server_cpu = after["cpu_s"] - before["cpu_s"]
    client_cpu = sum(o["cpu_s"] for o in outcomes)
    busy = machine_after[0] - machine_before[0]
    total = machine_after[1] - machine_before[1]
    nan = float("nan")
    return {
        "requests": n,
        "rps": n / args.duration,
        "errors": errors,
        "p50_ms": percentile(ordered, 0.50) * 1e3,
        "p90_ms": percentile(ordered, 0.90) * 1e3,
        "p99_ms": percentile(ordered, 0.99) * 1e3,
        "mean_ms": (sum(ordered) / n * 1e3) if n else nan,
        "server_cpu_per_req_ms": server_cpu / n * 1e3 if n else nan,
        "server_cpu_cores": server_cpu / args.duration,
        "client_cpu_per_req_ms": client_cpu / n * 1e3 if n else nan,
        "client_cpu_cores": client_cpu / args.duration,
        "machine_busy": busy / total if total else nan,
        "other_cores": others_cores(others_before, others_after, args.duration),
        "hwm_mib": after["hwm_kib"] / 1024,
        "rss_mib": after["rss_kib"] / 1024,
        "server_threads": after["threads"],
        "server_procs": after["procs"],
        "handshakes": sum(o["handshakes"] for o in outcomes),
        "reused": sum(o["reused"] for o in outcomes),
    }
