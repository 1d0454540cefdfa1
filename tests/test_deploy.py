"""The deployment: Compose files (both Compose implementations), the image recipe, Prometheus config / rules / rule
tests, the Grafana dashboard, and that every metric they query is one streamd exports. Ends with a real Prometheus
server scraping a live streamd metrics endpoint and evaluating the recording rule."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest, start_http_server

from streamd.cli import build_parser
from streamd.config import ProducerConfig, load_config
from streamd.metrics import FeederMetrics, InspectorMetrics, ProducerMetrics, TrainerMetrics, parse_samples
from streamd.wire import REJECT_REASONS

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
BASE = ROOT / "docker-compose.yml"
GPU = ROOT / "docker-compose.gpu.yml"
PROM = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "streamd.json"
STREAMD_SERVICES = ("producer", "trainer")


def interpolate(node, env: dict[str, str] | None = None):
    """Compose variable substitution (``${VAR}``, ``${VAR:-default}``, ``$$``) over a parsed file, from ``env``."""
    env = env or {}
    if isinstance(node, dict):
        return {k: interpolate(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate(v, env) for v in node]
    if not isinstance(node, str):
        return node
    pattern = r"\$\$|\$\{(\w+)(?::-([^}]*))?\}"
    return re.sub(pattern, lambda m: "$" if m[0] == "$$" else env.get(m[1]) or (m[2] or ""), node)


def compose(*files: Path) -> dict:
    """The files merged the way Compose merges overrides (mappings deep-merged, later wins), with default values."""
    merged: dict = {}
    for f in files:
        merged = _merge(merged, interpolate(yaml.safe_load(f.read_text())))
    return merged


def _merge(a, b):
    if isinstance(a, dict) and isinstance(b, dict):
        return {k: _merge(a[k], b[k]) if k in a and k in b else b.get(k, a.get(k)) for k in {**a, **b}}
    return b


def clean_env() -> dict[str, str]:
    """The test's environment without variables that would change what Compose interpolates."""
    names = re.findall(r"\$\{(\w+)", BASE.read_text() + GPU.read_text())
    return {k: v for k, v in os.environ.items() if k not in names and not k.startswith(("STREAMD_", "COMPOSE_"))}


# --- Compose ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("files", [[BASE], [BASE, GPU]], ids=["base", "base+gpu"])
@pytest.mark.parametrize("tool", [["docker-compose"], ["docker", "compose"]], ids=["compose-1.29", "compose-v2"])
def test_compose_config_is_accepted(tool, files):
    if shutil.which(tool[0]) is None:
        pytest.skip(f"{tool[0]} is not installed")
    if tool == ["docker", "compose"]:
        probe = subprocess.run([*tool, "version"], capture_output=True, text=True)
        if probe.returncode != 0:
            pytest.skip(f"Compose v2 plugin is not installed: {probe.stderr.strip()[:120]}")
    args = [*tool] + [a for f in files for a in ("-f", str(f))] + ["config", "-q"]
    r = subprocess.run(args, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_compose_services_ports_and_volumes():
    c = compose(BASE)
    services = c["services"]
    assert set(services) == {"kafka", "kafka-init", "feeder", "producer", "trainer", "inspector", "prometheus",
                             "grafana"}
    for name, svc in services.items():
        assert "container_name" not in svc, f"{name}: a fixed container_name prevents --scale"
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond this host by default"
        want = "no" if name == "kafka-init" else "unless-stopped"
        assert svc.get("restart") == want, name
    published = {name: [p.rsplit(":", 1)[1] for p in svc.get("ports", [])] for name, svc in services.items()}
    assert published == {"kafka": [], "kafka-init": [], "feeder": [], "producer": [], "trainer": ["9400"],
                         "inspector": ["9403"], "prometheus": ["9090"], "grafana": ["3000"]}

    named = set(c["volumes"])
    assert {"kafka-data", "checkpoints", "models"} <= named
    mounts = {name: {v.split(":")[0]: v.split(":")[1] for v in svc.get("volumes", [])} for name, svc in services.items()}
    for svc_mounts in mounts.values():
        for src in svc_mounts:
            if not src.startswith("."):
                assert src in named, f"volume {src} is not declared"
            else:
                assert (ROOT / src).exists(), f"bind mount {src} is missing from the repository"
    assert mounts["kafka"]["kafka-data"] == services["kafka"]["environment"]["KAFKA_LOG_DIRS"]
    assert "checkpoints" in mounts["trainer"] and "models" in mounts["producer"] and "models" in mounts["trainer"]
    run_dir = services["trainer"]["environment"]["STREAMD_TRAINER__RUN_DIR"]
    assert run_dir.startswith(mounts["trainer"]["checkpoints"] + "/"), "checkpoints must land on the named volume"


def test_streamd_services_healthcheck_their_own_metrics_port():
    services = compose(BASE)["services"]
    ports = {"producer": "STREAMD_PRODUCER__METRICS_PORT", "trainer": "STREAMD_METRICS__PORT"}
    for name in STREAMD_SERVICES:
        svc = services[name]
        env = svc["environment"]
        assert env["STREAMD_METRICS__HOST"] == "0.0.0.0"  # reachable by Prometheus from its container
        test = svc["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python", "-c"] and "curl" not in " ".join(test)
        assert f"http://127.0.0.1:{env[ports[name]]}/healthz" in test[3]
        assert (ROOT / svc["env_file"]).is_file()
        assert svc["depends_on"]["kafka-init"]["condition"] == "service_completed_successfully"
    for name in ("kafka", "prometheus", "grafana"):
        assert services[name]["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL"), name


def test_kafka_topic_fits_streamd_messages():
    services = compose(BASE)["services"]
    kafka_env, init_env = services["kafka"]["environment"], services["kafka-init"]["environment"]
    limit = int(kafka_env["KAFKA_MESSAGE_MAX_BYTES"])
    overhead = 64 * 1024  # record batch and record headers, key, producer id
    assert limit >= ProducerConfig().max_message_bytes + overhead
    assert int(kafka_env["KAFKA_REPLICA_FETCH_MAX_BYTES"]) >= limit
    assert int(init_env["MAX_MESSAGE_BYTES"]) == limit
    assert int(init_env["RETENTION_MS"]) > 0 and int(init_env["RETENTION_BYTES"]) > 0
    assert int(init_env["PARTITIONS"]) >= 4
    for name in STREAMD_SERVICES:
        env = services[name]["environment"]
        assert env["STREAMD_KAFKA__TOPIC"] == init_env["TOPIC"]
        assert env["STREAMD_KAFKA__PARTITIONS"] == init_env["PARTITIONS"]
        assert env["STREAMD_KAFKA__BOOTSTRAP_SERVERS"] == kafka_env["KAFKA_ADVERTISED_LISTENERS"].split("//")[1]
    assert kafka_env["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, no ZooKeeper


def test_gpu_override_reserves_gpus_for_streamd_services():
    base, gpu = yaml.safe_load(BASE.read_text()), yaml.safe_load(GPU.read_text())
    assert gpu["version"] == base["version"]  # docker-compose 1.29 refuses to merge different versions
    merged = compose(BASE, GPU)["services"]
    for name in STREAMD_SERVICES:
        svc = merged[name]
        (dev,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"]
        # one GPU by id per service (not ``count``: every service would take the same first GPU)
        assert "count" not in dev and len(dev["device_ids"]) == 1 and isinstance(dev["device_ids"][0], str)
        assert svc["image"] != compose(BASE)["services"][name]["image"]
    build = merged["trainer"]["build"]  # the one service that builds the image (see test_the_image_is_built_once)
    assert "cu" in build["args"]["TORCH_INDEX"] and build["dockerfile"] == "deploy/Dockerfile"
    assert merged["trainer"]["environment"]["STREAMD_TRAINER__DEVICE"] == "cuda"
    assert merged["producer"]["environment"]["STREAMD_PRODUCER__DEVICE"] == "cuda"
    gpus = {name: merged[name]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] for name in
            STREAMD_SERVICES}
    assert gpus["trainer"] != gpus["producer"]  # by default the trainer has a GPU of its own
    assert merged["producer"]["environment"]["STREAMD_PRODUCER__WIRE_DTYPE"] == "bfloat16"  # no fp16 overflow


@pytest.mark.parametrize("files", [[BASE], [BASE, GPU]], ids=["base", "base+gpu"])
def test_the_image_is_built_once(files):
    """One service builds the streamd image, the others run it and start after it (docker-compose 1.29 looks for
    a service's image in dependency order; a second `build` would build the same image again)."""
    services = compose(*files)["services"]
    builders = [name for name, svc in services.items() if "build" in svc]
    assert builders == ["trainer"], builders
    assert {services[n]["image"] for n in STREAMD_SERVICES} == {services["trainer"]["image"]}
    assert services["producer"]["depends_on"]["trainer"]["condition"] == "service_started"


def test_streamd_config_env_and_commands_are_valid(monkeypatch):
    """deploy/streamd.yaml plus the environment Compose gives each service loads; its command line parses."""
    services = compose(BASE)["services"]
    env_file = [ln for ln in (DEPLOY / "streamd.env").read_text().splitlines() if ln.strip() and ln[0] != "#"]
    assert all(ln.startswith("STREAMD_") for ln in env_file)
    for name in STREAMD_SERVICES:
        svc = services[name]
        for k in [k for k in os.environ if k.startswith("STREAMD_")]:
            monkeypatch.delenv(k)
        for k, v in svc["environment"].items():
            monkeypatch.setenv(k, str(v))
        args = build_parser().parse_args(svc["command"])
        assert args.command == svc["command"][0] and svc["command"][0] in ("produce", "train")
        container_path = Path(args.config)
        host_path = next(ROOT / v.split(":")[0] for v in svc["volumes"] if v.split(":")[1] == str(container_path))
        cfg = load_config(host_path)
        assert cfg.kafka.bootstrap_servers == ["kafka:9092"] and cfg.metrics.host == "0.0.0.0"


def test_dockerfile_is_consistent_with_the_repository():
    text = (DEPLOY / "Dockerfile").read_text()
    logical = re.sub(r"\\\n", " ", text)
    args = dict(re.findall(r"^ARG (\w+)=(\S*)", logical, re.M))
    for line in re.findall(r"^COPY (.+)$", logical, re.M):
        parts = [p for p in line.split() if not p.startswith("--")]
        for src in parts[:-1]:
            src = re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], src)
            assert (ROOT / src).exists(), f"COPY source {src} is missing from the build context"
    assert args["TORCH_VERSION"] == "2.13.0" and args["TORCH_INDEX"].endswith("/whl/cpu")
    users = re.findall(r"^USER (\S+)", logical, re.M)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r'^ENTRYPOINT \["streamd"\]', logical, re.M)
    assert "python:3.11-slim" in args["PYTHON_IMAGE"]
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignore and ".git" in ignore


# --- Prometheus ---------------------------------------------------------------------------------------------------

def _promtool(*args: str) -> subprocess.CompletedProcess:
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (Debian package `prometheus`)")
    return subprocess.run(["promtool", *args], cwd=PROM, capture_output=True, text=True, timeout=120)


def test_promtool_check_config():
    r = _promtool("check", "config", "prometheus.yml")
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_check_rules():
    r = _promtool("check", "rules", "rules.yml")
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_rule_unit_tests():
    r = _promtool("test", "rules", "rules_test.yml")
    assert r.returncode == 0, r.stdout + r.stderr


def rules() -> list[dict]:
    return [r for g in yaml.safe_load((PROM / "rules.yml").read_text())["groups"] for r in g["rules"]]


def test_every_alert_is_unit_tested_firing_and_quiet():
    tests = yaml.safe_load((PROM / "rules_test.yml").read_text())["tests"]
    cases = [c for t in tests for c in t.get("alert_rule_test", [])]
    for alert in (r["alert"] for r in rules() if "alert" in r):
        mine = [c for c in cases if c["alertname"] == alert]
        assert any(c["exp_alerts"] for c in mine), f"{alert}: no case where it fires"
        assert any(not c["exp_alerts"] for c in mine), f"{alert}: no case where it stays quiet"


def test_scrape_jobs_cover_rules_and_replicas():
    prom = yaml.safe_load((PROM / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    assert jobs["streamd-trainer"]["static_configs"][0]["targets"] == ["trainer:9400"]
    (dns,) = jobs["streamd-producer"]["dns_sd_configs"]
    producer_env = compose(BASE)["services"]["producer"]["environment"]
    assert dns["names"] == ["producer"] and dns["type"] == "A"
    assert str(dns["port"]) == str(producer_env["STREAMD_PRODUCER__METRICS_PORT"])
    for f in prom["rule_files"]:
        assert (PROM / f).is_file()
    referenced = set(re.findall(r'job=\\?"([\w-]+)', (PROM / "rules.yml").read_text() + DASHBOARD.read_text()))
    assert referenced and referenced <= set(jobs)


# --- Metric names used by rules and the dashboard -----------------------------------------------------------------

def exported() -> dict[str, set[str]]:
    """Every sample name a trainer and a producer export (after their first events), with its label names."""
    t = TrainerMetrics(["s"], REJECT_REASONS)
    t.tokens_consumed.labels(producer="p").inc()  # these two appear with their first producer / partition
    t.consumer_lag.labels(topic="x", partition="0").set(0)
    p = ProducerMetrics("p")
    p.outlier_tokens.labels(producer="p", site="resid_post.15", reason="norm")  # per site: the producer's sites
    f = FeederMetrics("t", "g")
    i = InspectorMetrics()
    i.observe("1", {"s": {"ce_loss_score": 1.0, "kl": 0.0, "fvu": 0.0, "l0": 1.0}}, 1, 1.0, 0.0)
    out: dict[str, set[str]] = {}
    for reg in (t.registry, p.registry, f.registry, i.registry):
        for name, series in parse_samples(generate_latest(reg).decode()).items():
            for labels, _ in series:
                out.setdefault(name, set()).update(labels)
    return out


def dashboard_exprs() -> list[str]:
    def walk(panels):
        for p in panels:
            yield from (t["expr"] for t in p.get("targets", []))
            yield from walk(p.get("panels", []))

    dash = json.loads(DASHBOARD.read_text())
    return list(walk(dash["panels"])) + [v["definition"] for v in dash["templating"]["list"]]


def referenced_series(expr: str) -> list[tuple[str, set[str]]]:
    """streamd_* names in a PromQL expression, each with the label names its selector or grouping uses."""
    out = []
    for m in re.finditer(r"\bstreamd_\w+", expr):
        rest = expr[m.end():]
        labels = set()
        if rest.startswith("{"):
            labels |= set(re.findall(r"(\w+)\s*[!=]~?", rest[1:rest.index("}")]))
        out.append((m[0], labels))
    return out


def test_every_queried_metric_is_exported():
    names = exported()
    exprs = dashboard_exprs() + [r["expr"] for r in rules()]
    seen = set()
    for expr in exprs:
        for name, labels in referenced_series(expr):
            seen.add(name)
            assert name in names, f"{name} (in {expr!r}) is not exported"
            assert labels <= names[name], f"{name} has no label(s) {labels - names[name]} (in {expr!r})"
        for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
            used = {g.strip() for g in group.split(",") if g.strip()}
            carriers = [names[n] for n, _ in referenced_series(expr)] + [{"instance", "job"}]
            assert used <= set().union(*carriers), f"grouping by {used} in {expr!r}"
    # histograms are queried through their _bucket / _sum / _count series
    assert {"streamd_forward_seconds_bucket", "streamd_forward_seconds_count"} <= seen


def test_dashboard_structure():
    dash = json.loads(DASHBOARD.read_text())
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/streamd.yml").read_text())["providers"][0]
    grafana_mounts = dict(v.split(":")[:2] for v in compose(BASE)["services"]["grafana"]["volumes"])
    assert grafana_mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    assert ds["url"] == "http://prometheus:9090"
    panels = dash["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for p in panels:
        for t in p.get("targets", []):
            assert t["datasource"]["uid"] == ds["uid"]
    (var,) = dash["templating"]["list"]
    assert var["name"] == "sae" and var["multi"] and var["includeAll"]
    rows = [p for p in panels if p["type"] == "row"]
    sae_row = next(r for r in rows if r.get("repeat") == "sae")
    per_sae = panels[panels.index(sae_row) + 1:]
    assert per_sae and all(p["type"] != "row" for p in per_sae)
    assert all('sae="$sae"' in t["expr"] for p in per_sae for t in p["targets"])
    titles = " | ".join(p["title"].lower() for p in panels)
    for want in ("tokens / s", "consumer lag", "buffer fill", "l0", "fvu", "loss terms", "dead / dense",
                 "feature density", "checkpoint age", "rejected messages"):
        assert want in titles, want
    heatmap = next(p for p in panels if p["type"] == "heatmap")
    assert "streamd_feature_density" in heatmap["targets"][0]["expr"]


# --- A real Prometheus scraping a live endpoint -------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _query(base: str, expr: str) -> list[dict]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.load(r)["data"]["result"]


@pytest.mark.timeout(90)
def test_prometheus_scrapes_streamd_and_records_lag(tmp_path):
    binary = shutil.which("prometheus") or "/usr/bin/prometheus"
    if not Path(binary).is_file():
        pytest.skip("prometheus is not installed (Debian package `prometheus`)")
    trainer = TrainerMetrics(["topk-k32"], REJECT_REASONS)
    producer = ProducerMetrics("p1")
    producer.tokens_published.labels(producer="p1").inc(5000)
    trainer.tokens_consumed.labels(producer="p1").inc(3000)
    trainer.tokens_trained.labels(sae="topk-k32").inc(2048)
    servers = [start_http_server(0, addr="127.0.0.1", registry=m.registry)[0] for m in (trainer, producer)]
    (tmp_path / "rules.yml").write_text((PROM / "rules.yml").read_text())
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": ["rules.yml"],
        "scrape_configs": [
            {"job_name": "streamd-trainer", "static_configs": [{"targets": [f"127.0.0.1:{servers[0].server_port}"]}]},
            {"job_name": "streamd-producer", "static_configs": [{"targets": [f"127.0.0.1:{servers[1].server_port}"]}]},
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = _free_port()
    proc = subprocess.Popen(
        [binary, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "w"))
    base = f"http://127.0.0.1:{port}"
    try:
        trained = lag = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (trained and lag):
            time.sleep(0.5)
            try:
                trained = _query(base, "streamd_tokens_trained_total")
                lag = _query(base, "streamd:stream_lag_tokens")
            except OSError:
                assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
        assert trained, "no streamd_tokens_trained_total in Prometheus within 60 s"
        (sample,) = trained
        assert sample["metric"]["sae"] == "topk-k32" and sample["metric"]["job"] == "streamd-trainer"
        assert float(sample["value"][1]) == 2048
        assert lag and float(lag[0]["value"][1]) == 2000  # 5000 published - 3000 consumed
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        for s in servers:
            s.shutdown()
            s.server_close()


# --- deploy/smoke.sh (not run here: it builds images for minutes; its settings and generated config are) ---------

SMOKE = DEPLOY / "smoke.sh"


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _render(tmp_path: Path, **ports) -> subprocess.CompletedProcess:
    env = {**clean_env(), "SMOKE_WORK": str(tmp_path / "work"), "SMOKE_GROUP": "streamd-smoke-test",
           **{k: str(v) for k, v in ports.items()}}
    return subprocess.run(["bash", str(SMOKE), "--render"], env=env, capture_output=True, text=True, timeout=60)


def test_smoke_script_parses():
    subprocess.run(["bash", "-n", str(SMOKE)], check=True, timeout=30)


def test_smoke_puts_every_port_in_a_setting(tmp_path):
    broker, trainer, producer, feeder, prom = _free_ports(5)
    out = _render(tmp_path, SMOKE_BROKER_PORT=broker, SMOKE_TRAINER_PORT=trainer, SMOKE_PRODUCER_PORT=producer,
                  SMOKE_FEEDER_PORT=feeder, SMOKE_PROMETHEUS_PORT=prom)
    assert out.returncode == 0, out.stderr
    work = tmp_path / "work"
    override = yaml.safe_load((work / "smoke.override.yml").read_text())
    svc = override["services"]
    assert svc["kafka"]["command"] == ["broker", "--port", str(broker)]
    assert f"{broker}" in svc["kafka"]["healthcheck"]["test"][3]
    for name in (*STREAMD_SERVICES, "feeder"):
        assert svc[name]["environment"]["STREAMD_KAFKA__BOOTSTRAP_SERVERS"] == f"127.0.0.1:{broker}"
    assert str(svc["trainer"]["environment"]["STREAMD_METRICS__PORT"]) == str(trainer)
    assert str(svc["producer"]["environment"]["STREAMD_PRODUCER__METRICS_PORT"]) == str(producer)
    assert f"127.0.0.1:{trainer}/healthz" in svc["trainer"]["healthcheck"]["test"][3]
    assert f"127.0.0.1:{producer}/healthz" in svc["producer"]["healthcheck"]["test"][3]
    assert str(svc["feeder"]["environment"]["STREAMD_FEED__METRICS_PORT"]) == str(feeder)
    assert f"127.0.0.1:{feeder}/healthz" in svc["feeder"]["healthcheck"]["test"][3]
    assert f"--web.listen-address=127.0.0.1:{prom}" in svc["prometheus"]["command"]
    assert svc["trainer"]["environment"]["STREAMD_TRAINER__GROUP_ID"] == "streamd-smoke-test"
    # the mounted Prometheus config scrapes this stack's ports, with the repository's rules
    assert svc["prometheus"]["volumes"] == [f"{work / 'prometheus'}:/etc/prometheus:ro"]
    prom_cfg = yaml.safe_load((work / "prometheus" / "prometheus.yml").read_text())
    targets = {j["job_name"]: j["static_configs"][0]["targets"] for j in prom_cfg["scrape_configs"]}
    assert targets == {"streamd-trainer": [f"127.0.0.1:{trainer}"], "streamd-producer": [f"127.0.0.1:{producer}"],
                       "streamd-feeder": [f"127.0.0.1:{feeder}"], "streamd-inspector": ["127.0.0.1:9403"],
                       "prometheus": [f"127.0.0.1:{prom}"]}
    assert (work / "prometheus" / "rules.yml").read_text() == (PROM / "rules.yml").read_text()
    rendered = (work / "smoke.override.yml").read_text() + (work / "prometheus" / "prometheus.yml").read_text()
    for default in ("19092", "9400", "9401", "9402", "9090"):
        assert default not in rendered, f"a fixed port {default} is left in the smoke config"
    if shutil.which("promtool"):
        r = subprocess.run(["promtool", "check", "config", "prometheus.yml"], cwd=work / "prometheus",
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
    if shutil.which("docker-compose"):  # the merge the script runs: the override's mount replaces the base one
        r = subprocess.run(["docker-compose", "-p", "streamd-smoke", "-f", str(BASE), "-f",
                            str(work / "smoke.override.yml"), "config"], capture_output=True, text=True,
                           timeout=60, env=clean_env())
        assert r.returncode == 0, r.stderr
        merged = yaml.safe_load(r.stdout)["services"]["prometheus"]["volumes"]
        etc = [v for v in merged if (v["target"] if isinstance(v, dict) else v.split(":")[1]) == "/etc/prometheus"]
        assert len(etc) == 1 and str(work / "prometheus") in str(etc[0])


def test_smoke_refuses_ports_in_use(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        broker, producer, feeder, prom = _free_ports(4)
        out = _render(tmp_path, SMOKE_BROKER_PORT=broker, SMOKE_TRAINER_PORT=port, SMOKE_PRODUCER_PORT=producer,
                      SMOKE_FEEDER_PORT=feeder, SMOKE_PROMETHEUS_PORT=prom)
    assert out.returncode != 0 and f"port {port} (SMOKE_TRAINER_PORT) is in use" in out.stderr
    assert not (tmp_path / "work" / "smoke.override.yml").exists()
    out = _render(tmp_path, SMOKE_BROKER_PORT=broker, SMOKE_TRAINER_PORT=broker, SMOKE_PRODUCER_PORT=producer,
                  SMOKE_FEEDER_PORT=feeder, SMOKE_PROMETHEUS_PORT=prom)
    assert out.returncode != 0 and "share port" in out.stderr


def test_smoke_success_needs_this_stacks_group():
    """The checks look for the group the script gave its trainer, in the trainer's /metrics and in Prometheus."""
    text = SMOKE.read_text()
    wait = text[text.index("# 4. Wait"):]
    assert 'mine="streamd_consumer_group{group=\\"$GROUP\\"} 1.0"' in wait
    assert 'has_line "http://127.0.0.1:$TRAINER_PORT/metrics" "$mine"' in wait
    assert 'group=\\"$GROUP\\"}"' in wait and "grep -Eq ' 1$' <<<\"$group\"" in wait
    metrics = TrainerMetrics(["s"], REJECT_REASONS)
    metrics.consumer_group.labels(group="streamd-smoke-test").set(1)
    exposed = generate_latest(metrics.registry).decode()
    assert 'streamd_consumer_group{group="streamd-smoke-test"} 1.0' in exposed.splitlines()
