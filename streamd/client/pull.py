"""Fetch a checkpoint from a running trainer's server (``load_sae`` is :mod:`streamd.client.load`).

``pull`` downloads into a ``.tmp-pull-*`` directory inside ``out``, checks every file's size and sha256 against the
server's description (and the ``X-Checkpoint-SHA256`` header), and only then renames it into ``out/<id>``: a reader
of ``out`` sees a complete checkpoint or none, and a failed pull leaves nothing behind.

What is already in ``out/<id>`` is reused only after it is checked: its ``manifest.json`` must have the sha256 the
server lists (a checkpoint of another run with the same id does not), and every file of a reused part is re-hashed.
A mismatch fetches that part again (or, for another run's checkpoint, the whole directory is replaced).

Safety of the client: the bearer token is sent only to the origin (scheme, host, port) it was given for, never
along a redirect to another origin; a redirect from https to http is refused; no file may be larger than the size
the description lists, nor the description larger than :data:`DESC_MAX_BYTES`. A busy server (HTTP 503 from its
connection cap, or a connection it resets) is retried with capped exponential backoff, honouring ``Retry-After``.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import http.client
import json
import logging
import os
import random
import re
import secrets
import shutil
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from streamd.files import sha256_file
from streamd.run.checkpoints import ID_RE, MANIFEST, NAME_RE, fsync_dir

log = logging.getLogger(__name__)

TOKEN_ENV = "STREAMD_CHECKPOINT_TOKEN"
DESC_MAX_BYTES = 16 << 20  # a checkpoint description lists a few files per SAE; anything this big is not one
BUSY_RETRIES = 8  # attempts after the first on 503 / reset connections, backoff 0.25 s doubling, capped
BUSY_BACKOFF_S = 0.25
BUSY_BACKOFF_MAX_S = 5.0
RESTARTS = 3  # a checkpoint removed by retention mid-pull: start again from the new latest, this many times
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


class PullError(RuntimeError):
    """A pull failed: server unreachable, unauthorized, nothing to pull, or a file did not match its size/sha256."""


class _Gone(PullError):
    """A file the description listed is gone (retention removed the checkpoint mid-pull): worth starting again."""


def resolve_token(token: str | None = None, token_file: str | Path | None = None) -> str | None:
    """The bearer token: ``token``, else the first line of ``token_file``, else ``$STREAMD_CHECKPOINT_TOKEN``."""
    if token:
        return token
    if token_file is not None:
        path = Path(token_file)
        try:
            text = path.read_text()
        except OSError as e:
            raise PullError(f"cannot read the token file {path}: {e.strerror or e}") from None
        lines = text.strip().splitlines()
        if not lines or not lines[0].strip():
            raise PullError(f"the token file {path} is empty")
        if path.stat().st_mode & 0o077:
            log.warning("token file %s is readable by other users (chmod 600 it)", path)
        return lines[0].strip()
    return os.environ.get(TOKEN_ENV) or None


def _origin(url: str) -> tuple[str, str | None, int | None]:
    s = urlsplit(url)
    scheme = s.scheme.lower()
    return scheme, (s.hostname or "").lower(), s.port or {"http": 80, "https": 443}.get(scheme)


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    """Redirects keep the token only within its origin, and never go from https to http."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001 (stdlib signature)
        if urlsplit(req.full_url).scheme == "https" and urlsplit(newurl).scheme != "https":
            raise PullError(f"GET {req.full_url}: refusing a redirect from https to {newurl}")
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        auth = req.unredirected_hdrs.get("Authorization")
        if new is not None and auth is not None:
            if _origin(newurl) == _origin(req.full_url):
                new.add_unredirected_header("Authorization", auth)
            else:
                log.info("redirect from %s to another origin (%s): not sending the token there", req.full_url, newurl)
        return new


def _transient(err: BaseException) -> bool:
    """A connection a busy server dropped (reset, closed before answering, TLS handshake cut), not a refusal."""
    if isinstance(err, urllib.error.URLError) and isinstance(err.reason, BaseException):
        err = err.reason
    return isinstance(err, (ConnectionResetError, ConnectionAbortedError, BrokenPipeError, ssl.SSLEOFError,
                            http.client.RemoteDisconnected, http.client.IncompleteRead))


def _backoff(attempt: int, retry_after: str | None) -> float:
    wait = min(BUSY_BACKOFF_MAX_S, BUSY_BACKOFF_S * 2**attempt) * (0.5 + random.random())
    try:
        if retry_after is not None:
            wait = max(wait, min(BUSY_BACKOFF_MAX_S, float(retry_after)))
    except ValueError:  # an HTTP date: ignore, the exponential wait stands
        pass
    return wait


OpenFn = Callable[[str], Any]


def _opener(token: str | None, cafile: str | Path | None, timeout: float, retries: int = BUSY_RETRIES) -> OpenFn:
    ctx = ssl.create_default_context(cafile=str(cafile) if cafile else None)
    opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=ctx), _RedirectHandler())

    def open_url(url: str):
        for attempt in range(retries + 1):
            req = urllib.request.Request(url)
            if token:
                req.add_unredirected_header("Authorization", f"Bearer {token}")  # not copied onto redirects
            try:
                return opener.open(req, timeout=timeout)
            except urllib.error.HTTPError as e:
                retry_after = e.headers.get("Retry-After") if e.headers else None
                e.close()
                if e.code in (429, 503) and attempt < retries:
                    time.sleep(_backoff(attempt, retry_after))
                    continue
                hint = " (wrong or missing token?)" if e.code == 401 else ""
                err = _Gone if e.code == 404 else PullError
                raise err(f"GET {url}: HTTP {e.code} {e.reason}{hint}") from None
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
                if _transient(e) and attempt < retries:
                    time.sleep(_backoff(attempt, None))
                    continue
                raise PullError(f"GET {url}: {getattr(e, 'reason', None) or e!r}") from e
        raise AssertionError("unreachable")

    return open_url


def _read_description(open_url: OpenFn, url: str) -> dict[str, Any]:
    with open_url(url) as resp:
        try:
            raw = resp.read(DESC_MAX_BYTES + 1)
        except (OSError, http.client.HTTPException) as e:
            raise PullError(f"GET {url}: {e!r}") from e
    if len(raw) > DESC_MAX_BYTES:
        raise PullError(f"{url} returned more than {DESC_MAX_BYTES} bytes; not a checkpoint description")
    try:
        desc = json.loads(raw)
    except ValueError as e:
        raise PullError(f"{url} did not return JSON: {e}") from e
    if not isinstance(desc, dict):
        raise PullError(f"{url} did not return a checkpoint description")
    ckid = str(desc.get("id", ""))
    if not ID_RE.match(ckid):
        raise PullError(f"server returned a malformed checkpoint id {ckid[:40]!r}")
    files, saes = desc.get("files"), desc.get("saes")
    if not isinstance(files, dict) or MANIFEST not in files or not isinstance(saes, list):
        raise PullError(f"{url}: the description lacks its files, manifest or SAEs")
    for rel, meta in files.items():
        if not isinstance(rel, str) or rel.count("/") > 1 or not all(NAME_RE.match(p) for p in rel.split("/")):
            raise PullError(f"server listed an unsafe file name {rel!r}")
        if not (isinstance(meta, dict) and isinstance(meta.get("sha256"), str) and _SHA_RE.match(meta["sha256"])
                and type(meta.get("size")) is int and meta["size"] >= 0):
            raise PullError(f"server listed {rel!r} without a valid sha256 and size")
    return desc


def _select(desc: dict[str, Any], sae: str | None) -> dict[str, dict[str, Any]]:
    """Every file of the checkpoint, or the manifest plus one SAE's directory."""
    files: dict[str, dict[str, Any]] = desc["files"]
    if sae is None:
        return files
    if sae not in desc["saes"]:
        raise PullError(f"checkpoint {desc['id']} has no SAE {sae!r}; it has {desc['saes']}")
    return {rel: f for rel, f in files.items() if rel == MANIFEST or rel.startswith(f"{sae}/")}


def _download(open_url: OpenFn, url: str, dest: Path, want: str, size: int) -> None:
    h = hashlib.sha256()
    n = 0
    with open_url(url) as resp, open(dest, "wb") as f:
        header = resp.headers.get("X-Checkpoint-SHA256")
        length = resp.headers.get("Content-Length")
        if length is not None and length.strip() != str(size):
            raise PullError(f"{url}: Content-Length {length[:20]} is not the listed size {size}")
        try:
            while chunk := resp.read(min(1 << 20, size - n + 1)):
                n += len(chunk)
                if n > size:
                    raise PullError(f"{url}: more bytes than the listed size {size}")
                h.update(chunk)
                f.write(chunk)
        except (OSError, http.client.HTTPException) as e:
            err = _Gone if _transient(e) else PullError
            raise err(f"{url}: download broke off after {n} of {size} bytes: {e!r}") from e
        f.flush()
        os.fsync(f.fileno())
    if n != size:
        raise PullError(f"{url}: got {n} bytes, the listed size is {size}")
    got = h.hexdigest()
    if got != want or (header is not None and header != want):
        raise PullError(f"{url}: sha256 {got} does not match the checkpoint's {want} (header {header})")


def _file_ok(path: Path, meta: dict[str, Any]) -> bool:
    try:
        return (path.is_file() and not path.is_symlink() and path.stat().st_size == meta["size"]
                and sha256_file(path) == meta["sha256"])
    except OSError:
        return False


def _needed(target: Path, wanted: dict[str, dict[str, Any]]) -> tuple[bool, set[str]]:
    """(stale, units to fetch). Units are what gets renamed into place: top-level files and whole SAE directories.

    ``stale``: ``target`` holds a checkpoint other than the server's (its manifest differs), so it is replaced
    whole. Otherwise a unit present in ``target`` is kept only if each of its files verifies and it has no others.
    """
    units = {rel.split("/")[0] for rel in wanted}
    if not target.is_dir():
        return False, units
    if not _file_ok(target / MANIFEST, wanted[MANIFEST]):
        return any(target.iterdir()), units
    bad = set()
    for unit in units - {MANIFEST}:
        listed = {rel for rel in wanted if rel.startswith(unit + "/")}
        d = target / unit
        if not d.is_dir() or d.is_symlink():
            bad.add(unit)
            continue
        on_disk = {f"{unit}/{p.name}" for p in d.iterdir()}
        if on_disk != listed or not all(_file_ok(target / rel, wanted[rel]) for rel in listed):
            if d.exists():
                log.warning("cached %s does not match the server's checkpoint; fetching it again", d)
            bad.add(unit)
    return False, bad


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An exclusive flock on ``directory`` itself: concurrent pulls into one cache install one at a time."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _install(out: Path, tmp: Path, target: Path, wanted: dict[str, dict[str, Any]], fetched: set[str]) -> None:
    """Move the fetched units into ``target``, under the lock, re-deciding what is needed (another pull may have
    installed them meanwhile). Parts of ``target`` that go are renamed to ``.tmp-*`` before they are deleted."""
    with _locked(out):
        stale, units = _needed(target, wanted)
        if not units:
            return
        if not units <= fetched:  # target changed under us into something we did not fetch for
            raise _Gone(f"{target} changed during the pull")
        trash = out / f".tmp-old-{target.name}-{secrets.token_hex(4)}"
        if stale or not target.is_dir():
            if target.is_dir():
                log.warning("cached %s is another checkpoint than the server's; replacing it", target)
                os.rename(target, trash)
            for unit in fetched - units:
                _remove(tmp / unit)
            os.rename(tmp, target)
        else:
            trash.mkdir()
            for unit in units:
                if (target / unit).exists() or (target / unit).is_symlink():
                    os.rename(target / unit, trash / unit)
                os.rename(tmp / unit, target / unit)
            fsync_dir(target)
        fsync_dir(out)
        _remove(trash)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def pull(
    url: str,
    out: Path,
    sae: str | None = None,
    token: str | None = None,
    cafile: str | Path | None = None,
    timeout: float = 60.0,
    *,
    token_file: str | Path | None = None,
    retries: int = BUSY_RETRIES,
) -> Path:
    """Pull the server's latest checkpoint (every file, or the manifest and one SAE) into ``out/<id>``.

    Returns ``out/<id>``. Parts already there are kept when they verify against the server's description (so
    pulling a second SAE of the same checkpoint adds its directory); anything else is fetched again. The token is
    ``token``, else ``token_file``'s first line, else ``$STREAMD_CHECKPOINT_TOKEN``.
    """
    base = url.rstrip("/")
    open_url = _opener(resolve_token(token, token_file), cafile, timeout, retries)
    out = Path(out)
    for restart in range(RESTARTS + 1):
        try:
            return _pull_once(open_url, base, out, sae)
        except _Gone as e:
            if restart == RESTARTS:
                raise PullError(str(e)) from None
            log.info("%s; pulling the latest checkpoint again", e)
    raise AssertionError("unreachable")


def latest_description(url: str, token: str | None = None, cafile: str | Path | None = None, timeout: float = 30.0,
                       *, token_file: str | Path | None = None) -> dict[str, Any]:
    """The server's description of its latest checkpoint (id, tokens, created_at, saes, files), checked as
    :func:`pull` checks it: cheap, for a follower asking whether there is a new one."""
    open_url = _opener(resolve_token(token, token_file), cafile, timeout)
    return _read_description(open_url, f"{url.rstrip('/')}/checkpoints/latest")


def _pull_once(open_url: OpenFn, base: str, out: Path, sae: str | None) -> Path:
    try:
        desc = _read_description(open_url, f"{base}/checkpoints/latest")
    except _Gone as e:  # no checkpoint at all is not worth a restart
        raise PullError(str(e)) from None
    ckid = desc["id"]
    wanted = _select(desc, sae)
    target = out / ckid
    _, units = _needed(target, wanted)
    if not units:
        return target
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".tmp-pull-{ckid}-{secrets.token_hex(4)}"
    try:
        tmp.mkdir()
        for rel, meta in sorted(wanted.items()):
            if rel.split("/")[0] not in units:
                continue
            (tmp / rel).parent.mkdir(exist_ok=True)
            _download(open_url, f"{base}/checkpoints/{ckid}/{quote(rel)}", tmp / rel, meta["sha256"], meta["size"])
        for d in {(tmp / rel).parent for rel in wanted if rel.split("/")[0] in units}:
            fsync_dir(d)
        _install(out, tmp, target, wanted, units)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise _Gone(f"{target} changed during the pull") from e
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("pulled checkpoint %s (%s) into %s", ckid, sae or "all SAEs", target)
    return target
