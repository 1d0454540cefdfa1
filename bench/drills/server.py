"""The checkpoint server under attack and under load, on 127.0.0.1 only.

A trainer-like server runs in its own process (``python -m bench.drills.server --serve RUN_DIR``): a
:class:`StatusServer` with a bearer token over a :class:`CheckpointStore` whose checkpoints rotate (a thread writes a
new one every ``ROTATE_S`` with ``keep_last=KEEP_LAST``, so checkpoints vanish under the pullers). This process then

1. tries every path-traversal request of ``tests/test_serve.py`` (with the right token): 400/404, no secret served;
2. tries bad tokens (none, wrong, other scheme, prefix, empty, in the query string, a 70 kB header): 401/431;
3. opens ``SLOW`` connections that drip a byte every ``DRIP_S`` s: each is closed within the header deadline (plus
   the wait for a worker), while a probe keeps being served;
4. starts ``PULLS`` concurrent ``pull()`` calls (a tenth of them into one shared directory) while checkpoints
   rotate: each must return a checkpoint that verifies or raise PullError leaving nothing behind; 503s from the
   connection cap are retried by the client. A torn download (a returned checkpoint that does not verify, or debris
   left behind) counts as lost.

The server's RSS and thread count are sampled before, during and after; growth past ``RSS_BOUND_MB`` is a fault
not survived.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch

from bench.drills.row import Row

TOKEN = "drill-token-0123456789"
KEEP_LAST = 2
ROTATE_S = 0.5
HEADER_TIMEOUT_S = 3.0
WORKERS, MAX_CONNECTIONS = 16, 64
SLOW, DRIP_S = 40, 2.0
PULLS = 200
RSS_BOUND_MB = 150.0
D_IN, D_SAE = 64, 512
SECRET = b"drill secret outside the checkpoints directory"


# ---- the server process --------------------------------------------------------------------------------------------


def _export(name: str, seed: int):
    from streamd.run.checkpoints import SAEExport

    g = torch.Generator().manual_seed(seed)
    w = {"W_enc": torch.randn(D_IN, D_SAE, generator=g), "W_dec": torch.randn(D_SAE, D_IN, generator=g),
         "b_enc": torch.randn(D_SAE, generator=g), "b_dec": torch.randn(D_IN, generator=g)}
    return SAEExport(name, {"architecture": "topk", "k": 8}, w, torch.full((D_SAE,), -2.0))


def _write(store, tokens: int) -> None:
    store.write(tokens, [_export("a", tokens), _export("b", tokens + 1)], {"step": tokens, "m": torch.ones(1000)},
                {"acts": {0: tokens}}, {"model_name": "drill", "streamd_version": "drill"}, "blocks.0.hook_resid_post")


def _serve(run_dir: Path) -> None:
    """Serve until stdin closes; ``rotate`` / ``still`` on stdin start and stop the checkpoint writer."""
    import logging

    from prometheus_client import CollectorRegistry

    from streamd.run.checkpoints import CheckpointStore
    from streamd.run.server import StatusServer

    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(1)
    store = CheckpointStore(run_dir, keep_last=KEEP_LAST)
    _write(store, 1000)
    (run_dir / "secret.txt").write_bytes(SECRET)
    server = StatusServer("127.0.0.1", 0, CollectorRegistry(), store=CheckpointStore(run_dir, writer=False),
                          token=TOKEN, workers=WORKERS, max_connections=MAX_CONNECTIONS,
                          header_timeout=HEADER_TIMEOUT_S).start()
    rotating, done, written = threading.Event(), threading.Event(), [0]

    def rotate() -> None:
        tokens = 1000
        while not done.is_set():
            if rotating.wait(0.1) and not done.is_set():
                tokens += 1000
                _write(store, tokens)
                written[0] += 1
                done.wait(ROTATE_S)

    t = threading.Thread(target=rotate, daemon=True)
    t.start()
    print(json.dumps({"port": server.port}), flush=True)
    for line in sys.stdin:
        {"rotate": rotating.set, "still": rotating.clear}.get(line.strip(), lambda: None)()
        print(json.dumps({"ok": line.strip(), "rejected": server.rejected, "written": written[0]}), flush=True)
    done.set()
    t.join(5)
    server.stop()


# ---- the drill ------------------------------------------------------------------------------------------------------


def _proc_status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "Threads"):
            out[key] = int(value.split()[0])
    return out


def _get(port: int, path: str, headers: dict | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _raw(port: int, data: bytes) -> tuple[int, bytes]:
    """Send ``data`` byte for byte (no client-side normalisation); the status code and body."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(data)
        buf = b""
        while chunk := s.recv(65536):
            buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    try:
        return int(head.split()[1]), body
    except (IndexError, ValueError):
        return 0, buf


def _traversals(port: int, ckid: str) -> tuple[int, int]:
    from tests.test_serve import TRAVERSALS

    auth = f"Authorization: Bearer {TOKEN}\r\n"
    ok = 0
    for raw in TRAVERSALS:
        path = raw.replace("000000000200", ckid)
        code, body = _raw(port, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{auth}\r\n".encode())
        ok += code in (400, 404) and SECRET not in body
    return len(TRAVERSALS), ok


def _bad_tokens(port: int, tmp: Path) -> tuple[int, int]:
    from streamd.client.pull import PullError, pull

    tries = [({}, "/checkpoints/latest"), ({"Authorization": "Bearer wrong"}, "/checkpoints/latest"),
             ({"Authorization": f"Basic {TOKEN}"}, "/checkpoints/latest"),
             ({"Authorization": f"Bearer {TOKEN}x"}, "/checkpoints"),
             ({"Authorization": f"Bearer {TOKEN[:-1]}"}, "/checkpoints/latest/manifest.json"),
             ({"Authorization": "Bearer "}, "/checkpoints/latest"),
             ({}, f"/checkpoints/latest?token={TOKEN}"),
             ({"Authorization": "Bearer " + "x" * 70_000}, "/checkpoints/latest")]
    ok = 0
    for headers, path in tries:
        code, body = _get(port, path, headers)
        ok += code in (401, 431, 400) and b"sha256" not in body
    left = tmp / "badtoken"
    try:
        pull(f"http://127.0.0.1:{port}", left, token="wrong")
    except PullError as e:
        ok += "401" in str(e) and (not left.exists() or not any(left.iterdir()))
    return len(tries) + 1, ok


def _slow_clients(port: int) -> tuple[int, int, str]:
    """SLOW connections dripping a request line; each must be closed within two header deadlines plus slack."""
    closed_after: list[float] = []
    probe: list[float] = []
    stop = threading.Event()

    def drip() -> None:
        t0 = time.monotonic()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
                for b in b"GET /checkpoints/latest HTTP/1.1\r\nHost: x\r\n" + b"X" * 100:
                    s.sendall(bytes([b]))
                    s.settimeout(DRIP_S)
                    try:
                        if s.recv(1024) == b"":
                            break  # closed by the server
                    except TimeoutError:
                        pass
                    except OSError:
                        break
                    if time.monotonic() - t0 > 60:
                        break
        except OSError:
            pass
        closed_after.append(time.monotonic() - t0)

    def probing() -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            code, _ = _get(port, "/healthz")
            if code == 200:
                probe.append(time.monotonic() - t0)
            stop.wait(0.5)

    threads = [threading.Thread(target=drip) for _ in range(SLOW)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    p = threading.Thread(target=probing)
    p.start()
    for t in threads:
        t.join(90)
    stop.set()
    p.join()
    bound = HEADER_TIMEOUT_S * -(-SLOW // WORKERS) + DRIP_S + 2  # waves of WORKERS, then noticing the close
    ok = sum(c <= bound for c in closed_after)
    note = (f"slow: closed after max {max(closed_after):.1f}s (bound {bound:.0f}s), probe max "
            f"{max(probe, default=float('nan')):.1f}s over {len(probe)} probes")
    return SLOW, ok, note


def _storm(port: int, tmp: Path, server_pid: int) -> tuple[int, int, int, str]:
    import streamd.client.pull as pull_module
    from streamd.client.pull import PullError, pull
    from streamd.files import sha256_file
    from streamd.run.checkpoints import MANIFEST, CheckpointError, CheckpointStore, read_manifest

    backoffs = [0]
    lock = threading.Lock()
    real_backoff = pull_module._backoff

    def counted(attempt: int, retry_after: str | None) -> float:
        with lock:
            backoffs[0] += 1
        return real_backoff(attempt, retry_after)

    restarts = [0]
    real_once = pull_module._pull_once

    def counted_once(*args, **kwargs):
        try:
            return real_once(*args, **kwargs)
        except pull_module._Gone:
            with lock:
                restarts[0] += 1
            raise

    pull_module._backoff, pull_module._pull_once = counted, counted_once
    url = f"http://127.0.0.1:{port}"
    barrier = threading.Barrier(PULLS)
    results: list[tuple[int, object]] = []
    samples: list[dict[str, int]] = []
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            samples.append(_proc_status(server_pid))
            sampling.wait(0.2)

    def one(i: int) -> None:
        out = tmp / ("shared" if i % 10 == 0 else f"p{i}")
        sae = "a" if i % 2 else None
        barrier.wait()
        try:
            r: object = pull(url, out, sae=sae, token=TOKEN, timeout=60)
        except PullError as e:
            r = e
        except Exception as e:  # noqa: BLE001 (anything else is an unclean failure)
            r = e
        with lock:
            results.append((i, r))

    s = threading.Thread(target=sample, daemon=True)
    s.start()
    t0 = time.monotonic()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(PULLS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(170 - (time.monotonic() - t0) if time.monotonic() - t0 < 170 else 0.1)
    wall = time.monotonic() - t0
    sampling.set()
    pull_module._backoff, pull_module._pull_once = real_backoff, real_once

    verified = clean_failures = torn = 0
    for i, r in results:
        if isinstance(r, Path):
            try:
                if i % 2:  # manifest + SAE "a"
                    m = read_manifest(r)
                    bad = [rel for rel, sha in m["files"].items() if rel.startswith("a/")
                           and sha256_file(r / rel) != sha]
                    if bad or not (r / MANIFEST).is_file():
                        raise CheckpointError(f"{r}: {bad}")
                else:
                    CheckpointStore.verify(r)
                verified += 1
            except (CheckpointError, OSError):
                torn += 1
        elif isinstance(r, PullError):
            clean_failures += 1
        else:
            torn += 1  # an exception that is not a clean PullError
    debris = [p for p in tmp.glob("*/.tmp-*")]
    torn += len(debris) + (PULLS - len(results))  # hung pulls count as lost
    peak_rss = max(x["VmRSS"] for x in samples) / 1024 if samples else float("nan")
    peak_threads = max(x["Threads"] for x in samples) if samples else -1
    ids = {r.name for _, r in results if isinstance(r, Path)}
    note = (f"{PULLS} pulls in {wall:.0f}s: {verified} verified ({len(ids)} distinct checkpoints), {clean_failures} "
            f"failed cleanly, {backoffs[0]} backoffs, {restarts[0]} restarts after a checkpoint vanished; server "
            f"peak RSS {peak_rss:.0f} MB, peak threads {peak_threads}")
    return PULLS, verified + clean_failures, torn, note


def drill_server() -> Row:
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory(prefix="streamd-drill-server-") as tmpname:
        tmp = Path(tmpname)
        proc = subprocess.Popen([sys.executable, "-m", "bench.drills.server", "--serve", str(tmp / "run")],
                                cwd=root, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            port = json.loads(proc.stdout.readline())["port"]

            def tell(cmd: str) -> dict:
                proc.stdin.write(cmd + "\n")
                proc.stdin.flush()
                return json.loads(proc.stdout.readline())

            rss0 = _proc_status(proc.pid)
            code, body = _get(port, "/checkpoints", {"Authorization": f"Bearer {TOKEN}"})
            ckid = json.loads(body)[-1]["id"]
            n1, ok1 = _traversals(port, ckid)
            n2, ok2 = _bad_tokens(port, tmp)
            n3, ok3, slow_note = _slow_clients(port)
            rss1 = _proc_status(proc.pid)
            tell("rotate")
            n4, ok4, torn, storm_note = _storm(port, tmp, proc.pid)
            stats = tell("still")
            time.sleep(1)
            rss2 = _proc_status(proc.pid)
        finally:
            proc.stdin.close()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
    growth = (rss2["VmRSS"] - rss0["VmRSS"]) / 1024
    mem_ok = growth < RSS_BOUND_MB
    faults = n1 + n2 + n3 + n4 + 1
    survived = ok1 + ok2 + ok3 + ok4 + mem_ok
    note = (f"traversal {ok1}/{n1}, bad tokens {ok2}/{n2}, {slow_note}; {storm_note}; "
            f"{stats['written']} checkpoints rotated, {stats['rejected']} connections 503'd; server RSS "
            f"{rss0['VmRSS'] / 1024:.0f} -> {rss1['VmRSS'] / 1024:.0f} (after slow) -> {rss2['VmRSS'] / 1024:.0f} MB "
            f"(after storm), threads {rss0['Threads']} -> {rss2['Threads']}")
    return Row(tried=4, faults=faults, survived=survived, inputs=n1 + n2 + n3 + n4, lost=torn, note=note)


DRILLS = {"server": drill_server}


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve":
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
        _serve(Path(sys.argv[2]))
    else:
        print("run drills with: python -m bench.drills server", file=sys.stderr)
        sys.exit(2)
