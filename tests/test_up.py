"""`streamd up`'s hand-off to its producer process (issue 13): no secret in the config file it writes, the file
0600 and removed at exit, and a producer that dies with `up`."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time

import yaml

from streamd.config import StreamdConfig
from streamd.up import producer_config


def test_the_producer_config_holds_no_secret_and_goes_away(tmp_path):
    cfg = StreamdConfig(
        kafka={"security": {"protocol": "SASL_SSL", "sasl_mechanism": "PLAIN", "sasl_username": "u",
                            "sasl_password": "hunter2-sasl"}},
        metrics={"checkpoint_token": "tok-secret-1"})
    path = tmp_path / "up-config.yaml"
    path.write_text("old\n")
    path.chmod(0o644)  # an older file's mode must not survive
    with producer_config(cfg, tmp_path) as (written, env):
        assert written == path
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        text = path.read_text()
        assert "hunter2-sasl" not in text and "tok-secret-1" not in text
        assert env == {"STREAMD_KAFKA__SECURITY__SASL_PASSWORD": "hunter2-sasl",
                       "STREAMD_METRICS__CHECKPOINT_TOKEN": "tok-secret-1"}
        assert yaml.safe_load(text)["kafka"]["security"]["sasl_username"] == "u"
    assert not path.exists()


def test_the_config_and_secrets_reach_the_producer_process(tmp_path, monkeypatch):
    """What the child loads from file + environment is the parent's config, secrets included."""
    cfg = StreamdConfig(metrics={"checkpoint_token": "tok-secret-2"}, kafka={"topic": "from-up"})
    for k in [k for k in os.environ if k.startswith("STREAMD_")]:
        monkeypatch.delenv(k)
    with producer_config(cfg, tmp_path) as (path, env):
        code = ("from streamd.config import load_config; c = load_config(path=%r); "
                "print(c.kafka.topic, c.metrics.checkpoint_token.get_secret_value())" % str(path))
        out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True,
                             text=True, timeout=60)
    assert out.stdout.split() == ["from-up", "tok-secret-2"], out.stderr[-2000:]


def test_the_producer_dies_with_up(tmp_path):
    """SIGKILL `up` (or the OOM killer does): its producer gets SIGTERM instead of retrying for ever."""
    parent = textwrap.dedent(f"""
        import sys, time
        from streamd.up import spawn_producer
        child = spawn_producer([sys.executable, "-c", "import time; time.sleep(120)"], open({str(tmp_path / 'p.log')!r}, "ab"), {{}})
        print(child.pid, flush=True)
        time.sleep(120)
    """)
    up = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    try:
        child = int(up.stdout.readline())
        os.kill(child, 0)  # running
        up.send_signal(signal.SIGKILL)
        up.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _alive(child):
            assert time.monotonic() < deadline, "the producer outlived a SIGKILLed up"
            time.sleep(0.1)
    finally:
        up.kill()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has died (its reaper is init)
    except FileNotFoundError:
        return False


def test_up_with_two_producers_divides_a_text_topic(tiny_llama_dir, tmp_path):
    """`streamd up --producers 2`: a feeder thread fills a text topic, both producers publish, and the trainer's
    /metrics count tokens of each; the documents in the activation messages (their provenance headers) are
    disjoint between the producers (each commits only its own text partitions)."""
    import re
    import threading
    import urllib.error

    from kafka import TopicPartition

    from streamd import wire
    from streamd.config import KafkaConfig
    from streamd.metrics import fetch_samples
    from streamd.produce.provenance import decode_provenance
    from streamd.stream.kafka import make_consumer

    run = tmp_path / "run"
    sets = [f"producer.model_path={tiny_llama_dir}", f"trainer.model_path={tiny_llama_dir}",
            "producer.sites=[{site: resid_post, layer: 1}]", "trainer.site={site: resid_post, layer: 1}",
            "producer.context_length=32", "producer.dtype=float32", "producer.metrics_port=0", "metrics.port=0",
            "producer.source.corpus=pydoc", "trainer.buffer_tokens=2048", "trainer.batch_size=256",
            "trainer.norm_estimate_tokens=512", "trainer.eval_tokens=0", "trainer.device=cpu",
            "trainer.saes=[{name: t, architecture: topk, expansion_factor: 2, k: 4}]", f"trainer.run_dir={run}",
            "feed.partitions=4", "producer.max_lag_messages=100000", "producer.producer_id=up-test",
            "inspect.port=0"]
    cmd = [sys.executable, "-m", "streamd", "up", "--producers", "2", "--max-tokens", "10000000"]  # stopped below
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()

    def printed(pattern: str) -> str:
        found = [m for line in list(lines) if (m := re.search(pattern, line))]
        return found[0].group(1) if found else ""

    pids = ("up-test-0", "up-test-1")
    consumed: dict[str, float] = {}
    try:
        deadline = time.monotonic() + 240
        while not (all(consumed.get(p, 0) > 0 for p in pids)):
            assert time.monotonic() < deadline and proc.poll() is None, "".join(lines)[-3000:]
            time.sleep(0.5)
            url = printed(r"^metrics\s+(\S+)")
            if url:
                try:
                    samples = fetch_samples(url)
                except (OSError, urllib.error.URLError):
                    continue
                consumed = {labels["producer"]: v for labels, v in samples.get("streamd_tokens_consumed_total", [])}
        assert set(consumed) == set(pids), consumed  # the trainer's per-producer counters: those two only
        # every activation message so far, by producer: the text documents its tokens came from
        kafka = KafkaConfig(bootstrap_servers=[printed(r"^broker\s+(\S+)")])
        consumer = make_consumer(kafka, group_id=None)
        parts = [TopicPartition(t, p) for t in sorted(consumer.topics()) if t.startswith("streamd.activations.g")
                 for p in sorted(consumer.partitions_for_topic(t) or ())]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        docs: dict[str, set] = {p: set() for p in pids}
        idle = 0
        while idle < 4:
            batch = consumer.poll(timeout_ms=500)
            idle = 0 if batch else idle + 1
            for recs in batch.values():
                for r in recs:
                    pid = wire.decode(r.value, check_finite=False).producer_id
                    docs[pid] |= {(part, off) for part, off, _doc, _lo, _n in decode_provenance(r.headers)}
        consumer.close()
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C: a final checkpoint, then up stops its producers and broker
        code = proc.wait(timeout=120)
    assert code == 0, "".join(lines)[-3000:]
    assert all(docs[p] for p in pids), {p: len(d) for p, d in docs.items()}
    shared = docs[pids[0]] & docs[pids[1]]
    assert not shared, f"{len(shared)} text records published by both producers, e.g. {sorted(shared)[:5]}"
    assert "feeder" in "".join(lines)
    assert re.search(r"inspector   pid \d+, log .*inspector.log; feature browser http://127.0.0.1:0/", "".join(lines))
    for i in range(2):
        log = (run / f"producer-{i}.log").read_text()
        assert re.search(r"text partitions assigned: \[\d", log), log[-2000:]
        published = re.search(r"published (\d+) tokens", log)
        assert published and int(published.group(1)) >= consumed[pids[i]], log[-2000:]
