"""`streamd` subcommands. Thin: parse, build the config (validated before anything starts), call the room that works."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from kafka.errors import KafkaError

from streamd.config import ConfigError, StreamdConfig, dump_config, load_config

log = logging.getLogger("streamd")

# Flags shared by the commands that take a config: flag -> dotted config field.
COMMON_FLAGS = {
    "--bootstrap": ("kafka.bootstrap_servers", str, "Kafka bootstrap servers, HOST:PORT[,HOST:PORT]"),
    "--topic": ("kafka.topic", str, "activation topic"),
    "--metrics-port": ("metrics.port", int, "port of /metrics, /healthz, /readyz, /checkpoints"),
}
PRODUCE_FLAGS = {
    "--model": ("producer.model_path", str, "HF model directory or .gguf file (default: shipped SmolLM2-135M)"),
    "--dtype": ("producer.dtype", str, "auto | float32 | bfloat16 | float16"),
    "--producer-id": ("producer.producer_id", str, "id carried by every message (default: HOST-PID)"),
    "--max-tokens": ("producer.max_tokens", int, "stop after publishing this many tokens"),
}
FEED_FLAGS = {
    "--text-topic": ("feed.topic", str, "the text topic the producers share"),
    "--state": ("feed.state_path", str, "file of the feeder's position (a restarted feeder continues there)"),
    "--max-documents": ("feed.max_documents", int, "stop after feeding this many documents"),
}
INSPECT_FLAGS = {
    "--port": ("inspect.port", int, "port of the feature browser, its API and /metrics (0: a free one)"),
    "--every-seconds": ("inspect.every_seconds", float, "at most one inspection per this many seconds"),
    "--tokens": ("inspect.tokens", int, "held-out tokens per inspection"),
}
TRAIN_FLAGS = {
    "--run-dir": ("trainer.run_dir", str, "run directory (checkpoints, metrics history, lock)"),
    "--group": ("trainer.group_id", str, "Kafka consumer group of this run"),
    "--max-tokens": ("trainer.max_tokens", int, "stop after training on this many tokens (enables lr decay)"),
    "--site-id": ("trainer.site_id", str, "hex site id to accept (default: computed from model + site)"),
}


def _add_config_args(p: argparse.ArgumentParser, *flag_sets: dict) -> None:
    p.add_argument("--config", "-c", type=Path, help="YAML config file")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override one config field (repeatable); values are YAML")
    seen = set()
    for flags in (COMMON_FLAGS, *flag_sets):
        for flag, (field, typ, help_) in flags.items():
            if flag not in seen:
                p.add_argument(flag, dest=field, type=typ, help=help_)
                seen.add(flag)


def _config(args: argparse.Namespace, defaults: dict[str, Any] | None = None) -> StreamdConfig:
    overrides = {k: v for k, v in vars(args).items() if "." in k or k in ("producer_count", "up_inspector")}
    return load_config(args.config, overrides, args.set, defaults=defaults)


def _world_size(text: str) -> int:
    n = int(text) if text.isdigit() else 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of ranks (1 or more)")
    return n


def _on_signals(stop) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop())


def cmd_config_show(args) -> int:
    print(dump_config(_config(args)), end="")
    return 0


def cmd_broker(args) -> int:
    from streamd.stream.broker import run_broker

    cfg = _config(args)
    run_broker(cfg.kafka, port=args.port, topic=cfg.kafka.topic, partitions=cfg.kafka.partitions)
    return 0


def cmd_produce(args) -> int:
    from streamd.produce.producer import ActivationProducer

    cfg = _config(args)
    prod = ActivationProducer(cfg)
    _on_signals(prod.stop)
    server = _producer_server(cfg, prod)
    try:
        n = prod.run()
    finally:
        if server:
            server.stop()
    log.info("published %d tokens in %d messages", n, prod.seq)
    return 0


def cmd_feed(args) -> int:
    from streamd.produce.feed import Feeder

    cfg = _config(args)
    feeder = Feeder(cfg)
    _on_signals(feeder.stop)
    server = None
    if cfg.feed.metrics_port:
        from streamd.run.server import StatusServer

        server = StatusServer(cfg.metrics.host, cfg.feed.metrics_port, feeder.metrics.registry, None,
                              lambda: (True, "feeding"))
        server.start()
        log.info("feeder metrics at %s/metrics", server.url)
    try:
        n = feeder.run()
    finally:
        if server:
            server.stop()
    log.info("fed %d documents to %s (epoch %d)", n, cfg.feed.topic, feeder.epoch)
    return 0


def _producer_server(cfg: StreamdConfig, prod):
    if not cfg.producer.metrics_port:
        return None
    from streamd.run.server import StatusServer

    server = StatusServer(cfg.metrics.host, cfg.producer.metrics_port, prod.metrics.registry, None,
                          lambda: (True, "producing"))
    server.start()
    log.info("producer metrics at %s/metrics", server.url)
    return server


def cmd_train(args) -> int:
    from streamd.train.distributed import check_parallel, world_from_env

    cfg = _config(args)
    _, world_size, _ = world_from_env()
    if args.world_size is not None and "RANK" not in os.environ:  # the launcher; torchrun sets RANK itself
        check_parallel(cfg, args.world_size, args.source)  # refused once, before any rank starts
        if args.world_size > 1:
            from streamd.train.launch import launch

            return launch(args.world_size, args.argv, cfg.trainer.collective_timeout_seconds)
    elif args.world_size is not None and args.world_size != world_size:
        raise ConfigError(f"--world-size {args.world_size}, but the environment (torchrun) says "
                          f"WORLD_SIZE={world_size}")
    from streamd.train.trainer import Trainer

    trainer = Trainer(cfg, activation_file=args.source, loop_file=args.loop,
                      on_progress=lambda p: print(p.line(), flush=True))
    _on_signals(trainer.stop)
    if trainer.server:
        print(f"metrics: {trainer.server.url}/metrics  checkpoints: {cfg.trainer.run_dir / 'checkpoints'}",
              flush=True)
    trainer.run()
    return 0


def cmd_up(args) -> int:
    from streamd.up import run_up

    cfg = _config(args, defaults=UP_DEFAULTS)
    return run_up(cfg)


# The one-machine default: a small buffer so training starts within a minute or two, cadences to match.
UP_DEFAULTS: dict[str, Any] = {
    "trainer.buffer_tokens": 65536,
    "trainer.batch_size": 2048,
    "trainer.warmup_tokens": 200_000,
    "trainer.dead_window_tokens": 2_000_000,
    "trainer.eval_every_tokens": 200_000,
    "trainer.torch_threads": 1,
    "producer.torch_threads": 1,
    "producer.dtype": "auto",  # bf16 where the CPU has it natively; emulated bf16 is ~40x slower than fp32
    "producer.source.loop": True,
    "checkpoints.every_tokens": 500_000,
    "checkpoints.every_seconds": 120.0,
    "trainer.run_dir": "runs/up",
    # Tansu keeps every record in memory: rotate topics so trained generations can be deleted, and hold the
    # producer back when the trainer lags, so the broker's footprint stays bounded however long it runs. At least the
    # generation grace: kafka.delivery_timeout_ms (120 s) + kafka.clock_skew_seconds (30 s).
    "kafka.generation_seconds": 180,
    "producer.max_lag_messages": 128,
    # the inspector beside them (bench/README.md, "Inside streamd up"): a small held-out sample, one inspection at
    # most every 20 minutes; measured on 2 cores, an inspection (~130 s) halves up's rate while it runs: ~9% of
    # its tokens at 10 minutes (about half that at 20: estimated, not measured)
    "inspect.tokens": 4096,
    "inspect.every_seconds": 1200,
}


def cmd_pull(args) -> int:
    from streamd.client.pull import pull

    path = pull(args.url, args.out, sae=args.sae, token=args.token, token_file=args.token_file, cafile=args.cafile)
    print(path)
    return 0


def cmd_status(args) -> int:
    from streamd.client.report import status

    print(status(args.url))
    return 0


def cmd_report(args) -> int:
    from streamd.client.report import write_report

    for path in write_report(args.run_dir, args.out or args.run_dir / "report"):
        print(path)
    return 0


def cmd_eval(args) -> int:
    from streamd.client.evaluate import eval_checkpoint

    cfg = _config(args)
    results = eval_checkpoint(cfg, args.checkpoint, n_docs=args.docs, token_file=args.token_file, cafile=args.cafile,
                              device=args.device)
    for name, r in results.items():
        print(name, " ".join(f"{k}={v}" if isinstance(v, int) else f"{k}={v:.4f}" for k, v in r.items()), flush=True)
    return 0


def cmd_features(args) -> int:
    from streamd.client.evaluate import fetch_checkpoint
    from streamd.inspect.inspection import build_inspector
    from streamd.inspect.static import write_static

    cfg = _config(args)
    found = fetch_checkpoint(cfg, args.checkpoint, token_file=args.token_file, cafile=args.cafile)
    print(write_static(build_inspector(cfg).inspect(found), args.out))
    return 0


def cmd_inspect(args) -> int:
    from streamd.inspect.follow import InspectorRole
    from streamd.inspect.inspection import build_inspector

    cfg = _config(args)
    role = InspectorRole(cfg, build_inspector(cfg), args.target, token_file=args.token_file, cafile=args.cafile)
    _on_signals(role.stop)
    role.run()
    return 0


def cmd_replay(args) -> int:
    from streamd.produce.replay import replay

    cfg = _config(args)
    n = replay(cfg.kafka, args.path, topic=cfg.kafka.topic, site_id=int(args.site_id, 16),
               producer_id=args.producer_id, max_message_bytes=cfg.producer.max_message_bytes)
    print(f"published {n} tokens from {args.path}")
    return 0


def _add_token_args(p: argparse.ArgumentParser, argv_token: bool = False) -> None:
    """How a client names the /checkpoints token and the server's CA (see streamd.client.pull.resolve_token)."""
    if argv_token:
        p.add_argument("--token", help="bearer token of /checkpoints (visible to other users in ps: prefer "
                                       "--token-file or $STREAMD_CHECKPOINT_TOKEN)")
    p.add_argument("--token-file", type=Path, help="file holding the bearer token of /checkpoints "
                                                   "(default: $STREAMD_CHECKPOINT_TOKEN)")
    p.add_argument("--cafile", type=Path, help="CA bundle for a TLS server")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="streamd", description=__doc__)
    ap.add_argument("--log-level", default="INFO")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("config", help="configuration tools")
    csub = p.add_subparsers(dest="config_command", required=True)
    show = csub.add_parser("show", help="print the effective config (file + env + flags)")
    _add_config_args(show, PRODUCE_FLAGS, TRAIN_FLAGS, FEED_FLAGS)
    show.set_defaults(func=cmd_config_show)

    p = sub.add_parser("broker", help="run the local Tansu Kafka broker on 127.0.0.1")
    _add_config_args(p)
    p.add_argument("--port", type=int, default=9092, help="0 picks a free port")
    p.set_defaults(func=cmd_broker)

    p = sub.add_parser("produce", help="publish activations of a frozen model to Kafka")
    _add_config_args(p, PRODUCE_FLAGS)
    p.set_defaults(func=cmd_produce)

    p = sub.add_parser("feed", help="publish a text source to the text topic the producers share")
    _add_config_args(p, FEED_FLAGS)
    p.set_defaults(func=cmd_feed)

    p = sub.add_parser("train", help="train SAEs from the activation topic (or cached files)")
    _add_config_args(p, TRAIN_FLAGS)
    p.add_argument("--source", type=Path, help="train from a .npy/.safetensors file instead of Kafka")
    p.add_argument("--loop", action="store_true", help="with --source: loop over the file")
    p.add_argument("--world-size", type=_world_size, metavar="N",
                   help="data-parallel: N local ranks (processes) train one set of SAEs (also works under torchrun)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("up", help="broker + producer + trainer on this machine (the embedded default)")
    _add_config_args(p)
    p.add_argument("--max-tokens", dest="trainer.max_tokens", type=int,
                   help="stop after training this many tokens, with a final export")
    p.add_argument("--producers", dest="producer_count", type=int,
                   help="producer processes; above 1 a feeder fills a text topic that they divide")
    p.add_argument("--no-inspector", dest="up_inspector", action="store_false", default=None,
                   help="do not start the inspector (feature browser)")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("pull", help="download the latest checkpoint from a running trainer")
    p.add_argument("url")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--sae", help="only this SAE")
    _add_token_args(p, argv_token=True)
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("status", help="live state of a trainer, from its /metrics")
    p.add_argument("url")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("report", help="PNG plots of a run's metrics history")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("eval", help="CE loss recovered and KL of a checkpoint's SAEs, spliced into the model")
    _add_config_args(p, PRODUCE_FLAGS)
    p.add_argument("checkpoint", help="checkpoint dir, run dir or URL")
    p.add_argument("--docs", type=int, default=64, help="held-out documents to evaluate on")
    _add_token_args(p)
    p.add_argument("--device", default="auto", help="where the model and SAEs run (auto: a GPU when there is one)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("features", help="feature dashboards of a checkpoint's SAEs as static HTML + JSON")
    _add_config_args(p, PRODUCE_FLAGS)
    p.add_argument("checkpoint", help="SAE, checkpoint or run dir, or a trainer's URL")
    p.add_argument("--out", type=Path, required=True, help="directory for index.html, SAE pages and JSON")
    _add_token_args(p)
    p.set_defaults(func=cmd_features)

    p = sub.add_parser("inspect", help="follow a trainer, inspect each new checkpoint, serve the feature browser")
    _add_config_args(p, PRODUCE_FLAGS, INSPECT_FLAGS)
    p.add_argument("target", help="a trainer's URL or a run directory")
    _add_token_args(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("replay", help="publish a cached activation file (.npy/.safetensors) in the wire format")
    _add_config_args(p)
    p.add_argument("path", type=Path)
    p.add_argument("--site-id", required=True, help="hex site id the trainer expects")
    p.add_argument("--producer-id", default="replay")
    p.set_defaults(func=cmd_replay)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what a launcher hands its ranks
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(max(logging.WARNING, logging.getLogger().level))  # its INFO is per connection
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"streamd: {e}", file=sys.stderr)
        return 2
    except KafkaError as e:
        print(f"streamd: Kafka error: {e} (is the broker reachable?)", file=sys.stderr)
        return 1
    except (OSError, ValueError, RuntimeError) as e:
        print(f"streamd: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
