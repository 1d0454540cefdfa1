#!/usr/bin/env bash
# Smoke test of the Compose deployment on a host that cannot pull images (not part of CI; run by hand, as root).
#
# What it does:
#   1. builds a local base image from Debian (debootstrap + `docker import`) instead of pulling python:3.11-slim,
#      and a Prometheus image on it (Debian's `prometheus` package) instead of pulling prom/prometheus;
#   2. builds deploy/Dockerfile on that base (host networking for pip);
#   3. runs docker-compose.yml with an override that puts Tansu (`streamd broker`, in the streamd image) in place of
#      Kafka, with host networking (everything on 127.0.0.1) and a small trainer, then starts kafka, kafka-init,
#      producer, trainer and prometheus (with deploy/prometheus mounted as is; `trainer` resolves to 127.0.0.1;
#      the producer job finds no replica, since its DNS discovery needs Compose's DNS). Grafana is not started;
#   4. waits until `streamd status` reports trained tokens and Prometheus has scraped the trainer
#      (`up{job="streamd-trainer"}` and `streamd_tokens_trained_total` > 0), prints both, and tears everything down
#      (volumes too).
#
# Needs: a running Docker engine (e.g. `dockerd --bridge=none --iptables=false &`), docker-compose (1.29 or v2),
# debootstrap, python3, and a docker client that can build with BuildKit (deploy/Dockerfile.dockerignore is a BuildKit
# feature): one with the buildx plugin, or a client older than 23 (BuildKit built in, e.g. Debian's docker.io).
# Settings (environment): SMOKE_WORK (scratch dir), SMOKE_SUITE / SMOKE_MIRROR (Debian), SMOKE_TORCH_INDEX (pip index
# for torch; default the PyTorch CPU index), SMOKE_WHEELS (a directory holding the torch wheel, e.g. a CPU wheel for
# the base's Python: served on 127.0.0.1 as the torch index, for hosts that cannot reach the PyTorch index; torch's
# own dependencies then come from SMOKE_PIP_INDEX, default PyPI), SMOKE_PIP_INDEX (extra pip index for everything),
# SMOKE_CA_CERTS (a PEM file of extra CA certificates the base image trusts, e.g. a TLS-intercepting proxy's),
# SMOKE_DOCKER (the docker client to use), SMOKE_PROMETHEUS_PORT (default 9090), SMOKE_TIMEOUT (s).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${SMOKE_WORK:-/tmp/streamd-smoke}
SUITE=${SMOKE_SUITE:-bookworm}
MIRROR=${SMOKE_MIRROR:-http://deb.debian.org/debian}
TIMEOUT=${SMOKE_TIMEOUT:-900}
BASE_IMAGE=streamd-smoke-base:$SUITE
IMAGE=streamd:smoke
PROM_IMAGE=streamd-smoke-prometheus:$SUITE
PROM_PORT=${SMOKE_PROMETHEUS_PORT:-9090}
PROJECT=streamd-smoke
START=$SECONDS

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
mkdir -p "$WORK"
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

# 3. Tansu instead of Kafka; everything on the host network (127.0.0.1), a trainer small enough for a laptop; Prometheus
#    with the repository's config, `trainer` (its scrape target) mapped to 127.0.0.1.
cat > "$WORK/smoke.override.yml" <<EOF
version: "3.8"
x-host: &host
  image: $IMAGE
  network_mode: host
services:
  kafka:
    <<: *host
    entrypoint: ["streamd"]
    command: ["broker", "--port", "19092"]
    environment:  # the topic as the base file configures it (Compose interpolates these)
      STREAMD_KAFKA__TOPIC: \${STREAMD_TOPIC:-streamd.activations}
      STREAMD_KAFKA__PARTITIONS: \${STREAMD_PARTITIONS:-8}
    healthcheck:
      test: ["CMD", "python", "-c", "import socket; socket.create_connection(('127.0.0.1', 19092), 2)"]
      start_period: 5s
  kafka-init:
    <<: *host
    entrypoint: ["true"]
    command: []
  producer:
    <<: *host
    environment:
      STREAMD_KAFKA__BOOTSTRAP_SERVERS: 127.0.0.1:19092
      STREAMD_METRICS__HOST: 127.0.0.1
      STREAMD_PRODUCER__TORCH_THREADS: 2
  trainer:
    <<: *host
    environment:
      STREAMD_KAFKA__BOOTSTRAP_SERVERS: 127.0.0.1:19092
      STREAMD_METRICS__HOST: 127.0.0.1
      STREAMD_TRAINER__BUFFER_TOKENS: 8192
      STREAMD_TRAINER__BATCH_SIZE: 1024
      STREAMD_TRAINER__WARMUP_TOKENS: 0
      STREAMD_TRAINER__EVAL_TOKENS: 0
      STREAMD_TRAINER__NORM_ESTIMATE_TOKENS: 1024
      STREAMD_TRAINER__TORCH_THREADS: 2
  prometheus:
    image: $PROM_IMAGE
    network_mode: host
    extra_hosts: ["trainer:127.0.0.1"]
    command:
      - --config.file=/etc/prometheus/prometheus.yml
      - --storage.tsdb.path=/prometheus
      - --web.listen-address=127.0.0.1:$PROM_PORT
    healthcheck:
      test: ["CMD", "python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$PROM_PORT/-/healthy', timeout=5)"]
EOF
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

# 4. Wait for trained tokens, then for Prometheus to have scraped them.
deadline=$((SECONDS + TIMEOUT))
until out=$(docker run --rm --network host "$IMAGE" status http://127.0.0.1:9400 2>/dev/null) \
      && grep -Eq 'tokens trained +[1-9]' <<<"$out"; do
  if ((SECONDS > deadline)); then echo "smoke: no tokens trained within ${TIMEOUT}s" >&2; exit 1; fi
  sleep 10
done
echo "$out"
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
until up=$(prom_query "$q_up" 2>/dev/null) && grep -Eq ' 1$' <<<"$up" \
      && tokens=$(prom_query "$q_tokens" 2>/dev/null) && grep -Eq ' [1-9][0-9.e+]*$' <<<"$tokens"; do
  if ((SECONDS > deadline)); then echo "smoke: Prometheus did not scrape trained tokens within ${TIMEOUT}s" >&2; exit 1; fi
  sleep 5
done
echo "prometheus: $q_up -> $up"
echo "prometheus: $q_tokens -> $tokens"
echo "smoke: OK"
