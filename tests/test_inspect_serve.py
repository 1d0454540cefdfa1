"""`streamd inspect` against a live trainer server: it inspects each new checkpoint, serves the browser and JSON API
behind its own bearer token, exports its metrics, keeps serving (and says how old its dashboards are) while the
trainer is away, picks up the next checkpoint when it is back, refuses a tampered download, and serves its last
dashboards at once after a restart."""

from __future__ import annotations

import html
import math
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry

from streamd.config import InspectConfig, StreamdConfig
from streamd.inspect.follow import InspectorRole
from streamd.inspect.inspection import Inspector
from streamd.inspect.sample import sample_windows
from streamd.metrics import parse_samples
from streamd.produce.model import load_frozen_model
from streamd.run.checkpoints import SAE_WEIGHTS, CheckpointStore
from streamd.run.server import StatusServer
from tests.test_inspect import CONTEXT, DOCS, random_sae, write_checkpoint

torch.set_num_threads(2)
HOOK = "blocks.1.hook_resid_post"
BROWSE = "br0wse"


def get(url: str, token: str | None = BROWSE) -> tuple[int, str]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def metric(samples, name: str, **labels: str) -> float:
    (value,) = [v for lab, v in samples[name] if lab == labels]
    return value


def wait_for(cond, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_inspector_follows_a_trainer_through_an_outage(tiny_llama_dir, tmp_path: Path):
    import json

    loaded = load_frozen_model(str(tiny_llama_dir))
    windows = sample_windows(loaded.tokenizer, iter(DOCS), CONTEXT, 512)
    run = tmp_path / "run"
    first = write_checkpoint(run, HOOK, random_sae(64, 24, 0.0, seed=1), "a").name
    (tmp_path / "token").write_text("s3cret\n")
    (tmp_path / "token").chmod(0o600)
    trainer = StatusServer("127.0.0.1", 0, CollectorRegistry(), CheckpointStore(run, writer=False),
                           token="s3cret").start()
    port = trainer.port
    cfg = StreamdConfig(inspect=InspectConfig(port=0, every_seconds=0.01, poll_seconds=0.1, out_dir=tmp_path / "ins",
                                              token=BROWSE, top_n=4, context_window=3))
    inspector = Inspector(loaded, windows, cfg.inspect)
    role = InspectorRole(cfg, inspector, trainer.url, token_file=tmp_path / "token")
    thread = threading.Thread(target=role.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: role.inspected == first, "the first inspection")
        base = role.server.url
        assert get(base + "/", None)[0] == 401 and get(base + "/", "wrong")[0] == 401
        code, home = get(base + "/")
        assert code == 200 and ">a</a>" in home and "CE loss recovered" in home

        code, body = get(base + "/api/sae/a?sort=density")
        rows = json.loads(body)["index"]
        assert code == 200 and len(rows) == 24
        assert [r["density"] for r in rows] == sorted((r["density"] for r in rows), reverse=True)
        page = get(base + "/sae/a/?sort=density")[1]
        assert [int(r.split(">")[0]) for r in page.split("data-latent=")[1:]] == [r["i"] for r in rows]
        top = rows[0]
        latent = json.loads(get(base + f"/api/sae/a/latent/{top['i']}")[1])
        assert get(base + f"/sae/a/latent/{top['i']}")[1].count("<mark class=hl") >= len(latent["top"]) > 0
        word = latent["top"][0]["tokens"][latent["top"][0]["center"]].strip()
        hits = get(base + f"/sae/a/?q={urllib.request.quote(word)}")[1]
        assert f"data-latent={top['i']}>" in hits
        assert "0 latents shown" in get(base + "/sae/a/?q=zzqxq-no-such-text")[1]
        assert get(base + "/sae/a/?sort=bogus")[0] == 400 and get(base + "/sae/nope/")[0] == 404

        m = parse_samples(get(base + "/metrics", None)[1])
        assert math.isfinite(metric(m, "streamd_inspect_ce_loss_score", sae="a"))
        assert metric(m, "streamd_inspect_fvu", sae="a") > 0 and metric(m, "streamd_inspect_l0", sae="a") > 0
        assert metric(m, "streamd_inspect_checkpoint_id") == float(first)
        assert metric(m, "streamd_inspect_dashboards_built_total") == len(json.loads(get(base + "/api/sae/a")[1])
                                                                      ["index"]) - sum(r["dead"] for r in rows)
        assert metric(m, "streamd_inspect_inspection_seconds") > 0 and metric(m, "streamd_inspect_checkpoint_age_seconds") >= 0

        trainer.stop()  # the trainer goes away: the dashboards stay, and say how old they are and why
        wait_for(lambda: role.problem, "a failed poll")
        code, home = get(base + "/")
        assert code == 200 and "s ago" in home and "checkpoint " + first in home and html.escape(role.problem) in home
        assert metric(parse_samples(get(base + "/metrics", None)[1]), "streamd_inspect_failures_total") >= 1

        second = write_checkpoint(run, HOOK, random_sae(64, 24, 0.0, seed=2), "a").name
        trainer = StatusServer("127.0.0.1", port, CollectorRegistry(), CheckpointStore(run, writer=False),
                               token="s3cret").start()
        wait_for(lambda: role.inspected == second and not role.problem, "the checkpoint after the outage")
        assert [p.name for p in (tmp_path / "ins" / "pulls").glob("*/0*")] == [second]  # the older pull is gone

        trainer.stop()  # (so the inspector cannot pull the next checkpoint before it is tampered with)
        third = write_checkpoint(run, HOOK, random_sae(64, 24, 0.0, seed=3), "a")
        weights = third / "a" / SAE_WEIGHTS
        data = weights.read_bytes()
        weights.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))  # the manifest still lists the old sha256
        trainer = StatusServer("127.0.0.1", port, CollectorRegistry(), CheckpointStore(run, writer=False),
                               token="s3cret").start()
        wait_for(lambda: "sha256" in role.problem, "the tampered download refused")
        assert role.inspected == second
    finally:
        role.stop()
        thread.join(timeout=30)
        trainer.stop()

    restarted = InspectorRole(cfg, inspector, trainer.url)
    assert restarted.inspected == second and set(restarted.dashboards) == {"a"}
    restarted.server.start()
    try:
        code, home = get(restarted.server.url + "/")
        assert code == 200 and "not yet checked against the trainer" in home
    finally:
        restarted.server.stop()


def test_the_browser_speaks_tls_and_is_not_ready_before_a_checkpoint(tiny_llama_dir, tmp_path: Path):
    import ssl

    from tests.test_serve import self_signed

    cert, key = self_signed(tmp_path)
    loaded = load_frozen_model(str(tiny_llama_dir))
    cfg = StreamdConfig(inspect=InspectConfig(port=0, out_dir=tmp_path / "ins", tls_certfile=cert, tls_keyfile=key))
    role = InspectorRole(cfg, Inspector(loaded, sample_windows(loaded.tokenizer, iter(DOCS), CONTEXT, 64),
                                        cfg.inspect), str(tmp_path / "no-run"))
    with pytest.raises(FileNotFoundError, match="no-run"):
        role.poll()
    with role.server:
        url = role.server.url
        assert url.startswith("https://127.0.0.1:")
        ctx = ssl.create_default_context(cafile=str(cert))
        for path, code in (("/healthz", 200), ("/readyz", 503), ("/", 503)):
            try:
                with urllib.request.urlopen(url + path, context=ctx, timeout=30) as resp:
                    got = resp.status
            except urllib.error.HTTPError as e:
                got = e.code
            assert got == code, path
