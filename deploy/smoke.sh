#!/usr/bin/env bash
# Smoke test of the Compose deployment on a host that cannot pull images (not part of CI; run by hand, as root).
#
# What it does:
#   1. builds a local base image from Debian (debootstrap + `docker import`) instead of pulling python:3.11-slim;
#   2. builds deploy/Dockerfile on that base (host networking for pip);
#   3. runs docker-compose.yml with an override that puts Tansu (`streamd broker`, in the streamd image) in place of
#      Kafka, with host networking and a small trainer, then starts kafka, kafka-init, producer and trainer only
#      (Prometheus and Grafana images cannot be built here; deploy/prometheus is checked by the test suite);
#   4. waits until `streamd status` reports trained tokens, prints it, and tears everything down (volumes too).
#
# Needs: a running Docker engine (e.g. `dockerd --iptables=false &`), docker-compose (1.29 or v2) and debootstrap.
# Settings (environment): SMOKE_WORK (scratch dir), SMOKE_SUITE / SMOKE_MIRROR (Debian), SMOKE_TORCH_INDEX (pip index
# for torch; default the PyTorch CPU index), SMOKE_PIP_INDEX (extra pip index for everything), SMOKE_TIMEOUT (s).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${SMOKE_WORK:-/tmp/streamd-smoke}
SUITE=${SMOKE_SUITE:-bookworm}
MIRROR=${SMOKE_MIRROR:-http://deb.debian.org/debian}
TIMEOUT=${SMOKE_TIMEOUT:-900}
BASE_IMAGE=streamd-smoke-base:$SUITE
IMAGE=streamd:smoke
PROJECT=streamd-smoke
if docker compose version >/dev/null 2>&1; then COMPOSE=(docker compose); else COMPOSE=(docker-compose); fi
mkdir -p "$WORK"

# 1. Base image: Debian's python3 with pip usable system-wide (what python:3.11-slim gives).
if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  rm -rf "$WORK/rootfs"
  debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates "$SUITE" "$WORK/rootfs" "$MIRROR"
  ln -sf python3 "$WORK/rootfs/usr/bin/python"
  rm -f "$WORK"/rootfs/usr/lib/python3*/EXTERNALLY-MANAGED
  tar -C "$WORK/rootfs" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8' \
    --change 'CMD ["python3"]' - "$BASE_IMAGE"
fi

# 2. The streamd image, built exactly as users build it, on the local base.
build_args=(--build-arg "PYTHON_IMAGE=$BASE_IMAGE"
            --build-arg "TORCH_INDEX=${SMOKE_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}")
DOCKER_BUILDKIT=${DOCKER_BUILDKIT:-1} docker build --network host -f "$ROOT/deploy/Dockerfile" "${build_args[@]}" \
  ${SMOKE_PIP_INDEX:+--build-arg "PIP_EXTRA_INDEX_URL=$SMOKE_PIP_INDEX"} -t "$IMAGE" "$ROOT"

# 3. Tansu instead of Kafka; everything on the host network (127.0.0.1), a trainer small enough for a laptop.
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
      STREAMD_PRODUCER__TORCH_THREADS: 2
  trainer:
    <<: *host
    environment:
      STREAMD_KAFKA__BOOTSTRAP_SERVERS: 127.0.0.1:19092
      STREAMD_TRAINER__BUFFER_TOKENS: 8192
      STREAMD_TRAINER__BATCH_SIZE: 1024
      STREAMD_TRAINER__WARMUP_TOKENS: 0
      STREAMD_TRAINER__EVAL_TOKENS: 0
      STREAMD_TRAINER__NORM_ESTIMATE_TOKENS: 1024
      STREAMD_TRAINER__TORCH_THREADS: 2
EOF
compose() { "${COMPOSE[@]}" -p "$PROJECT" -f "$ROOT/docker-compose.yml" -f "$WORK/smoke.override.yml" "$@"; }
cleanup() { compose logs --tail 50 producer trainer || true; compose down -v --remove-orphans || true; }
trap cleanup EXIT
compose up -d --no-build kafka kafka-init producer trainer

# 4. Wait for trained tokens.
deadline=$((SECONDS + TIMEOUT))
until out=$(docker run --rm --network host "$IMAGE" status http://127.0.0.1:9400 2>/dev/null) \
      && grep -Eq 'tokens trained +[1-9]' <<<"$out"; do
  if ((SECONDS > deadline)); then echo "smoke: no tokens trained within ${TIMEOUT}s" >&2; exit 1; fi
  sleep 10
done
echo "$out"
echo "smoke: OK"
