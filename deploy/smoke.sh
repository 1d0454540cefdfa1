#!/usr/bin/env bash
# Smoke test of the Compose deployment on a host that cannot pull images (not part of CI; run by hand, as root).
#
#   sudo deploy/smoke.sh             # the whole run (image builds take minutes)
#   deploy/smoke.sh --render         # only check the ports and write the Compose override and Prometheus config
#                                    # into $SMOKE_WORK (no docker needed; what the tests check)
#
# What it does:
#   1. builds a local base image from Debian (debootstrap + `docker import`) instead of pulling python:3.11-slim,
#      and a Prometheus image on it (Debian's `prometheus` package) instead of pulling prom/prometheus;
#   2. builds deploy/Dockerfile on that base (host networking for pip), once: every streamd service runs that image;
#   3. runs docker-compose.yml with an override that puts Tansu (`streamd broker`, in the streamd image) in place of
#      Kafka, with host networking (everything on 127.0.0.1, on the ports below, which must be free) and a small
#      trainer in its own consumer group (SMOKE_GROUP), then starts kafka, kafka-init, producer, trainer and
#      prometheus (deploy/prometheus's config with its scrape targets rewritten to those ports). Grafana is not
#      started;
#   4. waits until this stack's trainer (the one reporting SMOKE_GROUP in `streamd_consumer_group`) has trained
#      tokens and Prometheus has scraped it (`up{job="streamd-trainer"}`, `streamd_tokens_trained_total` > 0 and
#      `streamd_consumer_group{group="$SMOKE_GROUP"}`), prints them, and tears everything down (volumes too).
#      Another trainer on one of these ports cannot make it pass: the ports are checked free before anything
#      starts (and again after the builds), and the group is this run's.
#
# Needs: root, a running Docker engine (e.g. Debian's `docker.io`; `dockerd --bridge=none --iptables=false &`),
# docker-compose (1.29 or v2), debootstrap, python3, and a docker client that can build with BuildKit
# (deploy/Dockerfile.dockerignore is a BuildKit feature): one with the buildx plugin, or a client older than 23
# (BuildKit built in, e.g. Debian's docker.io).
# Settings (environment): SMOKE_WORK (scratch dir), SMOKE_SUITE / SMOKE_MIRROR (Debian), SMOKE_TORCH_INDEX (pip index
# for torch; default the PyTorch CPU index), SMOKE_WHEELS (a directory holding the torch wheel, e.g. a CPU wheel for
# the base's Python: served on 127.0.0.1 as the torch index, for hosts that cannot reach the PyTorch index; torch's
# own dependencies then come from SMOKE_PIP_INDEX, default PyPI), SMOKE_PIP_INDEX (extra pip index for everything),
# SMOKE_CA_CERTS (a PEM file of extra CA certificates the base image trusts, e.g. a TLS-intercepting proxy's),
# SMOKE_DOCKER (the docker client to use), SMOKE_BROKER_PORT (default 19092), SMOKE_TRAINER_PORT (9400),
# SMOKE_PRODUCER_PORT (9401), SMOKE_FEEDER_PORT (9402), SMOKE_PROMETHEUS_PORT (9090), SMOKE_GROUP (the trainer's consumer group; default
# streamd-smoke-<time>-<pid>), SMOKE_TIMEOUT (s).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${SMOKE_WORK:-/tmp/streamd-smoke}
SUITE=${SMOKE_SUITE:-bookworm}
MIRROR=${SMOKE_MIRROR:-http://deb.debian.org/debian}
TIMEOUT=${SMOKE_TIMEOUT:-900}
BASE_IMAGE=streamd-smoke-base:$SUITE
IMAGE=streamd:smoke
PROM_IMAGE=streamd-smoke-prometheus:$SUITE

BROKER_PORT=${SMOKE_BROKER_PORT:-19092}
TRAINER_PORT=${SMOKE_TRAINER_PORT:-9400}
PRODUCER_PORT=${SMOKE_PRODUCER_PORT:-9401}
FEEDER_PORT=${SMOKE_FEEDER_PORT:-9402}
PROM_PORT=${SMOKE_PROMETHEUS_PORT:-9090}
GROUP=${SMOKE_GROUP:-streamd-smoke-$(date +%s)-$$}
PROJECT=streamd-smoke
START=$SECONDS

# Every port this stack listens on must be free: under host networking another trainer (or broker, Prometheus) on
# one of them would answer the checks below in place of this stack's.
check_ports() {
  local name port busy=
  for name in SMOKE_BROKER_PORT SMOKE_TRAINER_PORT SMOKE_PRODUCER_PORT SMOKE_FEEDER_PORT SMOKE_PROMETHEUS_PORT; do
    case $name in
      SMOKE_BROKER_PORT) port=$BROKER_PORT ;;
      SMOKE_TRAINER_PORT) port=$TRAINER_PORT ;;
      SMOKE_PRODUCER_PORT) port=$PRODUCER_PORT ;;
      SMOKE_FEEDER_PORT) port=$FEEDER_PORT ;;
      SMOKE_PROMETHEUS_PORT) port=$PROM_PORT ;;
    esac
    if ! [[ $port =~ ^[0-9]+$ ]] || ((port < 1 || port > 65535)); then
      echo "smoke: $name=$port is not a port" >&2; busy=1; continue
    fi
    if ! python3 -c 'import socket, sys
s = socket.socket()
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)' "$port"; then
      echo "smoke: port $port ($name) is in use on 127.0.0.1: stop what listens there or set $name" >&2; busy=1
    fi
  done
  local shared
  shared=$(printf '%s\n' "$BROKER_PORT" "$TRAINER_PORT" "$PRODUCER_PORT" "$FEEDER_PORT" "$PROM_PORT" | sort | uniq -d |
    xargs)
  if [[ -n $shared ]]; then echo "smoke: the SMOKE_*_PORT settings share port(s) $shared" >&2; busy=1; fi
  [[ -z $busy ]]
}

# The Compose override (Tansu for Kafka, host networking, this run's ports and group) and Prometheus' config (the
# repository's, with its scrape targets on those ports), into $WORK.
render() {
  mkdir -p "$WORK/prometheus"
  cp "$ROOT/deploy/prometheus/rules.yml" "$WORK/prometheus/"
  python3 - "$ROOT/deploy/prometheus/prometheus.yml" "$WORK/prometheus/prometheus.yml" \
    "$TRAINER_PORT" "$PRODUCER_PORT" "$FEEDER_PORT" "$PROM_PORT" <<'PY'
import re, sys
src, dst, trainer, producer, feeder, prom = sys.argv[1:]
text = open(src).read()
out = text.replace('"trainer:9400"', '"127.0.0.1:%s"' % trainer).replace('"localhost:9090"', '"127.0.0.1:%s"' % prom)
out = out.replace('"feeder:9402"', '"127.0.0.1:%s"' % feeder)
out = out.replace('"inspector:9403"', '"127.0.0.1:9403"')  # the inspector too (not started by the smoke run)
# the producers' DNS discovery needs Compose's DNS: under host networking the one replica is on loopback
out = re.sub(r"dns_sd_configs:\n(?:[ \t]+.*\n)*?[ \t]+refresh_interval: \S+\n",
             'static_configs:\n      - targets: ["127.0.0.1:%s"]\n' % producer, out)
for need in (trainer, producer, feeder, prom):
    if '"127.0.0.1:%s"' % need not in out:
        sys.exit("smoke: could not point %s at 127.0.0.1:%s (its scrape targets changed?)" % (src, need))
open(dst, "w").write(out)
PY
  cat > "$WORK/smoke.override.yml" <<EOF
version: "3.8"
x-host: &host
  image: $IMAGE
  network_mode: host
services:
  kafka:
    <<: *host
    entrypoint: ["streamd"]
    command: ["broker", "--port", "$BROKER_PORT"]
    environment:  # the topic as the base file configures it (Compose interpolates these)
      STREAMD_KAFKA__TOPIC: \${STREAMD_TOPIC:-streamd.activations}
      STREAMD_KAFKA__PARTITIONS: \${STREAMD_PARTITIONS:-8}
    healthcheck:
      test: ["CMD", "python", "-c", "import socket; socket.create_connection(('127.0.0.1', $BROKER_PORT), 2)"]
      start_period: 5s
  kafka-init:
    <<: *host
    entrypoint: ["true"]
    command: []
  producer:
    <<: *host
    environment:
      STREAMD_KAFKA__BOOTSTRAP_SERVERS: 127.0.0.1:$BROKER_PORT
      STREAMD_METRICS__HOST: 127.0.0.1
      STREAMD_PRODUCER__METRICS_PORT: $PRODUCER_PORT
      STREAMD_PRODUCER__TORCH_THREADS: 2
    healthcheck:
      test: ["CMD", "python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$PRODUCER_PORT/healthz', timeout=5)"]
  feeder:
    <<: *host
    environment:
      STREAMD_KAFKA__BOOTSTRAP_SERVERS: 127.0.0.1:$BROKER_PORT
      STREAMD_METRICS__HOST: 127.0.0.1
      STREAMD_FEED__METRICS_PORT: $FEEDER_PORT
    healthcheck:
      test: ["CMD", "python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$FEEDER_PORT/healthz', timeout=5)"]
  trainer:
    <<: *host
    environment:
      STREAMD_KAFKA__BOOTSTRAP_SERVERS: 127.0.0.1:$BROKER_PORT
      STREAMD_METRICS__HOST: 127.0.0.1
      STREAMD_METRICS__PORT: $TRAINER_PORT
      STREAMD_TRAINER__GROUP_ID: $GROUP
      STREAMD_TRAINER__BUFFER_TOKENS: 8192
      STREAMD_TRAINER__BATCH_SIZE: 1024
      STREAMD_TRAINER__WARMUP_TOKENS: 0
      STREAMD_TRAINER__EVAL_TOKENS: 0
      STREAMD_TRAINER__NORM_ESTIMATE_TOKENS: 1024
      STREAMD_TRAINER__TORCH_THREADS: 2
    healthcheck:
      test: ["CMD", "python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$TRAINER_PORT/healthz', timeout=5)"]
  prometheus:
    image: $PROM_IMAGE
    network_mode: host
    command:
      - --config.file=/etc/prometheus/prometheus.yml
      - --storage.tsdb.path=/prometheus
      - --web.listen-address=127.0.0.1:$PROM_PORT
    volumes:
      - $WORK/prometheus:/etc/prometheus:ro
    healthcheck:
      test: ["CMD", "python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$PROM_PORT/-/healthy', timeout=5)"]
EOF
}

mkdir -p "$WORK"
check_ports || exit 1
render
if [[ ${1:-} == --render ]]; then
  echo "smoke: ports free; wrote $WORK/smoke.override.yml and $WORK/prometheus/prometheus.yml (group $GROUP)"
  exit 0
fi

# A docker client that builds with BuildKit: clients from 23 on need the buildx plugin for it, older ones have it built
# in. Without BuildKit the build would ignore deploy/Dockerfile.dockerignore and send .venv and the rest as context.
DOCKER=${SMOKE_DOCKER:-}
if [[ -z $DOCKER ]]; then
  for c in $(type -ap docker); do
    if "$c" buildx version >/dev/null 2>&1; then DOCKER=$c; break; fi
    v=$("$c" version --format '{{.Client.Version}}' 2>/dev/null || true); v=${v%%.*}
    if [[ $v =~ ^[0-9]+$ ]] && ((v < 23)); then DOCKER=$c; break; fi
  done
  [[ -n $DOCKER ]] || { echo "smoke: no docker client with BuildKit (install buildx, or set SMOKE_DOCKER)" >&2; exit 1; }
fi
docker() { "$DOCKER" "$@"; }
if docker compose version >/dev/null 2>&1; then COMPOSE=(docker compose); else COMPOSE=(docker-compose); fi
SERVER_PID=
STACK_UP=
cleanup() {
  if [[ -n $STACK_UP ]]; then
    compose logs --tail 50 kafka producer trainer prometheus || true
    compose down -v --remove-orphans || true
  fi
  if [[ -n $SERVER_PID ]]; then kill "$SERVER_PID" 2>/dev/null || true; fi
  echo "smoke: $((SECONDS - START)) s"
}
trap cleanup EXIT

# 1. Base image: Debian's python3 with pip usable system-wide (what python:3.11-slim gives).
if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  rm -rf "$WORK/rootfs"
  debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates "$SUITE" "$WORK/rootfs" "$MIRROR"
  ln -sf python3 "$WORK/rootfs/usr/bin/python"
  rm -f "$WORK"/rootfs/usr/lib/python3*/EXTERNALLY-MANAGED
  if [[ -n ${SMOKE_CA_CERTS:-} ]]; then  # e.g. a TLS-intercepting proxy's CA, for pip inside the builds
    cp "$SMOKE_CA_CERTS" "$WORK/rootfs/usr/local/share/ca-certificates/smoke-extra.crt"
    chroot "$WORK/rootfs" update-ca-certificates
  fi
  tar -C "$WORK/rootfs" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8' \
    --change 'CMD ["python3"]' - "$BASE_IMAGE"
  rm -rf "$WORK/rootfs"
fi
if ! docker image inspect "$PROM_IMAGE" >/dev/null 2>&1; then
  DOCKER_BUILDKIT=1 docker build --network host -t "$PROM_IMAGE" - <<EOF
FROM $BASE_IMAGE AS deb
RUN apt-get update && apt-get install -y --no-install-recommends prometheus
FROM $BASE_IMAGE
COPY --from=deb /usr/bin/prometheus /usr/bin/promtool /usr/bin/
ENTRYPOINT ["/usr/bin/prometheus"]
EOF
fi

# 2. The streamd image, built exactly as users build it, on the local base.
TORCH_INDEX=${SMOKE_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}
if [[ -n ${SMOKE_WHEELS:-} ]]; then
  # A one-project PEP 503 index (/torch/) served from the wheels directory on loopback (pip trusts 127.0.0.0/8).
  rm -rf "$WORK/index"; mkdir -p "$WORK/index/torch"
  cp "$SMOKE_WHEELS"/torch-*.whl "$WORK/index/torch/"
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  python3 -m http.server --bind 127.0.0.1 --directory "$WORK/index" "$port" >"$WORK/index.log" 2>&1 &
  SERVER_PID=$!
  TORCH_INDEX=http://127.0.0.1:$port/
  SMOKE_PIP_INDEX=${SMOKE_PIP_INDEX:-https://pypi.org/simple}
fi
build_args=(--build-arg "PYTHON_IMAGE=$BASE_IMAGE" --build-arg "TORCH_INDEX=$TORCH_INDEX")
DOCKER_BUILDKIT=1 docker build --network host -f "$ROOT/deploy/Dockerfile" "${build_args[@]}" \
  ${SMOKE_PIP_INDEX:+--build-arg "PIP_EXTRA_INDEX_URL=$SMOKE_PIP_INDEX"} -t "$IMAGE" "$ROOT"

# 3. Tansu instead of Kafka (the override rendered above), the ports checked again: the builds took a while.
check_ports || exit 1
# An override cannot remove the base file's published ports, which Docker refuses with host networking: merge the two
# files (`config`) and drop `ports` from the host-network services.
"${COMPOSE[@]}" -p "$PROJECT" -f "$ROOT/docker-compose.yml" -f "$WORK/smoke.override.yml" config >"$WORK/smoke.merged.yml"
docker run --rm -i --network none --entrypoint python3 "$IMAGE" -c '
import sys, yaml
d = yaml.safe_load(sys.stdin)
for s in d["services"].values():
    if s.get("network_mode") == "host":
        s.pop("ports", None)
yaml.safe_dump(d, sys.stdout, sort_keys=False)' <"$WORK/smoke.merged.yml" >"$WORK/smoke.compose.yml"
compose() { "${COMPOSE[@]}" -p "$PROJECT" --project-directory "$ROOT" -f "$WORK/smoke.compose.yml" "$@"; }
STACK_UP=1
compose up -d --no-build kafka kafka-init producer trainer prometheus

# 4. Wait for trained tokens on this stack's trainer (its group), then for Prometheus to have scraped them.
deadline=$((SECONDS + TIMEOUT))
mine="streamd_consumer_group{group=\"$GROUP\"} 1.0"
has_line() {  # URL TEXT: whether the page at URL holds TEXT
  docker run --rm --network host --entrypoint python3 "$IMAGE" -c '
import sys, urllib.request
sys.exit(sys.argv[2] not in urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())' "$1" "$2"
}
until out=$(docker run --rm --network host "$IMAGE" status "http://127.0.0.1:$TRAINER_PORT" 2>/dev/null) \
      && grep -Eq 'tokens trained +[1-9]' <<<"$out" \
      && has_line "http://127.0.0.1:$TRAINER_PORT/metrics" "$mine" 2>/dev/null; do
  if ((SECONDS > deadline)); then echo "smoke: no tokens trained by group $GROUP within ${TIMEOUT}s" >&2; exit 1; fi
  sleep 10
done
echo "$out"
echo "trainer: $mine"
# Prints "<labels> <value>" for each series of an instant query.
prom_query() {
  docker run --rm --network host --entrypoint python3 "$IMAGE" -c '
import json, sys, urllib.parse, urllib.request
url = "http://127.0.0.1:%s/api/v1/query?query=%s" % (sys.argv[1], urllib.parse.quote(sys.argv[2]))
for r in json.load(urllib.request.urlopen(url, timeout=5))["data"]["result"]:
    print(json.dumps(r["metric"], sort_keys=True), r["value"][1])' "$PROM_PORT" "$1"
}
q_up='up{job="streamd-trainer"}'
q_tokens='streamd_tokens_trained_total{job="streamd-trainer"}'
q_group="streamd_consumer_group{job=\"streamd-trainer\", group=\"$GROUP\"}"
until up=$(prom_query "$q_up" 2>/dev/null) && grep -Eq ' 1$' <<<"$up" \
      && tokens=$(prom_query "$q_tokens" 2>/dev/null) && grep -Eq ' [1-9][0-9.e+]*$' <<<"$tokens" \
      && group=$(prom_query "$q_group" 2>/dev/null) && grep -Eq ' 1$' <<<"$group"; do
  if ((SECONDS > deadline)); then
    echo "smoke: Prometheus did not scrape group $GROUP's trained tokens within ${TIMEOUT}s" >&2; exit 1
  fi
  sleep 5
done
echo "prometheus: $q_up -> $up"
echo "prometheus: $q_tokens -> $tokens"
echo "prometheus: $q_group -> $group"
echo "smoke: OK"
