"""`streamd inspect`: follow a trainer (its URL, or a run directory), inspect each new checkpoint at most every
``inspect.every_seconds``, and serve the feature browser, its JSON API and /metrics.

A URL is asked for its latest checkpoint's description every ``inspect.poll_seconds`` (cheap); a new id is pulled
with :func:`streamd.client.pull.pull` (token, TLS, size and sha256 checks) into ``inspect.out_dir/pulls``. The last
dashboards are written to ``inspect.out_dir/dashboards/<sae>.json`` and read back at start, so a restarted
inspector serves them at once. When the trainer goes away the browser keeps serving them and says how old they are
and why they are not newer; it picks up the next checkpoint when the trainer comes back.
"""

from __future__ import annotations

import calendar
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from streamd.client import locate
from streamd.client.evaluate import checkpoint_token, fetch_checkpoint
from streamd.client.pull import latest_description
from streamd.config import StreamdConfig
from streamd.inspect.html import Links, home_page, index_page, latent_page, sorted_rows
from streamd.inspect.inspection import Inspector
from streamd.metrics import InspectorMetrics
from streamd.run.checkpoints import ID_RE, read_manifest
from streamd.run.server import StatusServer

log = logging.getLogger(__name__)

LINKS = Links(sae_index=lambda n, s: f"/sae/{quote(n)}/?sort={s}", latent=lambda n, i: f"/sae/{quote(n)}/latent/{i}",
              home=lambda: "/")
_HTML = "text/html; charset=utf-8"
_JSON = "application/json"


def _written_at(created_at: str | None) -> float:
    try:
        return float(calendar.timegm(time.strptime(created_at or "", "%Y-%m-%dT%H:%M:%SZ")))
    except ValueError:
        return time.time()


def _remove_older_pulls(kept: Path) -> None:
    """The pulled checkpoints beside ``kept``: inspected, never needed again (each is the size of the SAEs)."""
    for other in kept.parent.iterdir():
        if other != kept and ID_RE.match(other.name) and other.is_dir():
            shutil.rmtree(other, ignore_errors=True)


class InspectorRole:
    """The long-running inspector (see the module docstring). ``target``: a trainer's URL or a run directory."""

    def __init__(self, cfg: StreamdConfig, inspector: Inspector, target: str, *, token_file: Path | None = None,
                 cafile: Path | None = None) -> None:
        self.cfg, self.inspector, self.target = cfg, inspector, target
        self.token_file, self.cafile = token_file, cafile
        self.metrics = InspectorMetrics()
        self.dashboards: dict[str, dict[str, Any]] = {}
        self.inspected: str | None = None  # checkpoint id of the dashboards
        self.last_inspection = float("-inf")  # monotonic
        self.problem = ""  # why the dashboards may be stale (the last poll's error)
        self._stop = threading.Event()
        self._dir = cfg.inspect.out_dir / "dashboards"
        self._load_saved()
        i = cfg.inspect
        self.server = StatusServer.secured(i.host, i.port, i.token, i.tls_certfile, i.tls_keyfile,
                                           self.metrics.registry, None, self._ready, pages=self.page)

    # ---- following ---------------------------------------------------------------------------------------------

    def latest_id(self) -> str:
        if locate.is_url(self.target):
            token = checkpoint_token(self.cfg, None, self.token_file)
            return latest_description(self.target, token, self.cafile)["id"]
        return read_manifest(locate.checkpoint_dir(self.target))["id"]

    def poll(self) -> bool:
        """Inspect the latest checkpoint if it is new and the last inspection is old enough; True if it did."""
        ckid = self.latest_id()
        due = time.monotonic() - self.last_inspection >= self.cfg.inspect.every_seconds
        if ckid == self.inspected or not due:
            return False
        t0 = time.monotonic()
        found = fetch_checkpoint(self.cfg, self.target, token_file=self.token_file, cafile=self.cafile,
                                 cache_dir=self.cfg.inspect.out_dir / "pulls")
        dashboards = self.inspector.inspect(found)
        seconds = time.monotonic() - t0
        self._save(dashboards)
        if locate.is_url(self.target) and found.checkpoint is not None:
            _remove_older_pulls(found.checkpoint)
        self.dashboards, self.inspected, self.last_inspection = dashboards, found.manifest.get("id", ckid), t0
        self.metrics.observe(self.inspected, {n: d["metrics"] for n, d in dashboards.items()},
                             sum(len(d["latents"]) for d in dashboards.values()), seconds,
                             _written_at(found.manifest.get("created_at")))
        log.info("checkpoint %s inspected in %.1f s: %s", self.inspected, seconds, "; ".join(
            f"{n} CE recovered {d['metrics']['ce_loss_score']:.4f} FVU {d['metrics']['fvu']:.4f}"
            for n, d in dashboards.items()))
        return True

    def run(self) -> None:
        """Serve, and poll until :meth:`stop`; a failed poll is logged, counted and retried."""
        self.server.start()
        print(f"feature browser: {self.server.url}/", flush=True)
        try:
            while not self._stop.is_set():
                try:
                    self.poll()
                    self.problem = ""
                except Exception as e:  # the trainer away, a torn pull, a checkpoint that does not fit: keep serving
                    self.metrics.failures.inc()
                    if str(e) != self.problem:
                        log.warning("inspector: %s", e)
                    self.problem = str(e)
                self._stop.wait(self.cfg.inspect.poll_seconds)
        finally:
            self.server.stop()

    def stop(self) -> None:
        self._stop.set()

    def _ready(self) -> tuple[bool, str]:
        return (True, "serving dashboards") if self.dashboards else (False, "no checkpoint inspected yet")

    # ---- the last dashboards on disk ------------------------------------------------------------------------------

    def _save(self, dashboards: dict[str, dict[str, Any]]) -> None:
        self._dir.mkdir(parents=True, exist_ok=True)
        for old in self._dir.glob("*.json"):
            if old.stem not in dashboards:
                old.unlink()
        for name, dash in dashboards.items():
            tmp = self._dir / f".{name}.json.tmp"
            tmp.write_text(json.dumps(dash))
            os.replace(tmp, self._dir / f"{name}.json")

    def _load_saved(self) -> None:
        for path in sorted(self._dir.glob("*.json")):
            try:
                dash = json.loads(path.read_text())
                self.dashboards[dash["sae"]] = dash
            except (OSError, ValueError, KeyError) as e:
                log.warning("ignoring %s: %r", path, e)
        if self.dashboards:
            self.inspected = next(iter(self.dashboards.values()))["checkpoint"]
            self.problem = "dashboards from before this inspector started; not yet checked against the trainer"

    # ---- the browser and the API ----------------------------------------------------------------------------------

    def stale_note(self) -> str:
        if not self.dashboards:
            return ""
        age = time.time() - min(d["built_at"] for d in self.dashboards.values())
        note = f"dashboards of checkpoint {self.inspected}, built {age:.0f} s ago"
        return f"{note}; {self.problem}" if self.problem else ""

    def page(self, path: str, query: dict[str, str]) -> tuple[int, bytes, str] | None:
        parts = [unquote(p) for p in path.strip("/").split("/")] if path.strip("/") else []
        api = bool(parts) and parts[0] == "api"
        if api:
            parts = parts[1:]
        if not parts:
            if api:
                return 200, self._json({"checkpoint": self.inspected, "problem": self.problem,
                                        "saes": {n: {k: d[k] for k in ("checkpoint", "hook", "d_sae", "n_tokens",
                                                                        "built_at", "metrics")}
                                                 for n, d in self.dashboards.items()}}), _JSON
            if not self.dashboards:
                msg = f"no checkpoint inspected yet{': ' + self.problem if self.problem else ''}"
                return 503, msg.encode() + b"\n", "text/plain; charset=utf-8"
            return 200, home_page(self.dashboards, LINKS, stale=self.stale_note()), _HTML
        if parts[0] != "sae" or len(parts) < 2 or parts[1] not in self.dashboards:
            return None
        dash = self.dashboards[parts[1]]
        if len(parts) == 2:
            sort, q = query.get("sort", "index"), query.get("q", "")
            if api:
                return 200, self._json({k: v for k, v in dash.items() if k != "latents"}
                                       | {"index": sorted_rows(dash, sort, q)}), _JSON
            return 200, index_page(dash, sort, LINKS, q, search=True, stale=self.stale_note()), _HTML
        if len(parts) == 4 and parts[2] == "latent" and parts[3] in dash["latents"]:
            if api:
                return 200, self._json(dash["latents"][parts[3]]), _JSON
            return 200, latent_page(dash, int(parts[3]), LINKS), _HTML
        return None

    @staticmethod
    def _json(obj: Any) -> bytes:
        return json.dumps(obj).encode()

