"""Text sources: shipped corpora, files/globs with precise errors, stdin, looping, and a real Kafka text topic."""

from __future__ import annotations

import io
import itertools
import json

import pytest

from streamd.produce import text as sources
from streamd.config import SourceConfig
from streamd.produce.text import SourceError, iter_source


def take(it, n):
    return list(itertools.islice(it, n))


def test_kjv_paragraphs():
    docs = list(iter_source(SourceConfig(kind="corpus", corpus="kjv")))
    assert len(docs) == 4635
    assert docs[0].startswith("In the beginning God created the heaven and the earth.")
    assert docs[-1].endswith("The grace of our Lord Jesus Christ be with you all. Amen.")
    assert not any("[" in d or "]" in d or "\n" in d for d in docs)


def test_pydoc_topics():
    from pydoc_data.topics import topics

    docs = list(iter_source(SourceConfig(corpus="pydoc")))
    assert len(docs) == len(topics) and sorted(docs) == sorted(topics.values())


def test_fortunes_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "FORTUNES_DIR", tmp_path / "absent")
    with pytest.raises(SourceError, match="fortunes.*absent"):
        iter_source(SourceConfig(corpus="fortunes"))


def test_fortunes_parsing(tmp_path, monkeypatch):
    (tmp_path / "wisdom").write_text("A penny saved.\n%\nTwo\nlines.\n%\n\n%\nLast, no trailing percent.\n")
    (tmp_path / "wisdom.dat").write_bytes(b"\x00\x01binary index")
    monkeypatch.setattr(sources, "FORTUNES_DIR", tmp_path)
    assert list(iter_source(SourceConfig(corpus="fortunes"))) == [
        "A penny saved.",
        "Two\nlines.",
        "Last, no trailing percent.",
    ]


def test_txt_blocks_jsonl_and_globs(tmp_path):
    (tmp_path / "a.txt").write_text("first para\nsecond line\n\n\nnext para\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "from json", "id": 1}) + "\n\n" + '{"text": "two"}\n')
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "c.txt").write_text("deep")
    globs = [str(tmp_path / "*.txt"), str(tmp_path / "b.jsonl"), str(tmp_path / "**/c.txt")]
    cfg = SourceConfig(kind="files", paths=globs)
    assert list(iter_source(cfg)) == ["first para\nsecond line", "next para", "from json", "two", "deep"]


def test_jsonl_custom_field(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"body": "x"}\n{"body": "y"}\n')
    cfg = SourceConfig(kind="files", paths=[str(tmp_path / "d.jsonl")], text_field="body")
    assert list(iter_source(cfg)) == ["x", "y"]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad.jsonl", '{"text": "ok"}\n{"text": oops}\n', r"bad\.jsonl:2: bad JSON"),
        ("nofield.jsonl", '{"text": "ok"}\n\n{"body": "x"}\n', r"nofield\.jsonl:3: no string field 'text'"),
        ("latin.txt", "fine\n\xe9t\xe9\n", r"latin\.txt:2: not UTF-8"),
        ("notes.md", "# hi", r"notes\.md: unsupported extension"),
    ],
)
def test_bad_input_names_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content.encode("latin-1"))
    with pytest.raises(SourceError, match=message):
        list(iter_source(SourceConfig(kind="files", paths=[str(path)])))


def test_missing_files_fail_at_creation(tmp_path):
    with pytest.raises(SourceError, match=r"missing\.txt does not exist"):
        iter_source(SourceConfig(kind="files", paths=[str(tmp_path / "missing.txt")]))
    with pytest.raises(SourceError, match="matches no files"):
        iter_source(SourceConfig(kind="files", paths=[str(tmp_path / "*.jsonl")]))


def test_loop_restarts_and_refuses_empty(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\ntwo\n")
    looped = iter_source(SourceConfig(kind="files", paths=[str(tmp_path / "a.txt")], loop=True))
    assert take(looped, 5) == ["one", "two", "one", "two", "one"]
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(SourceError, match="no documents"):
        next(iter_source(SourceConfig(kind="files", paths=[str(tmp_path / "empty.txt")], loop=True)))
    assert take(iter_source(SourceConfig(corpus="pydoc", loop=True)), 200)[79:81] == take(sources.pydoc_topics(), 2)


def test_stdin_blocks():
    stream = io.StringIO("alpha\nbeta\n\n\ngamma\n   \ndelta")
    assert list(iter_source(SourceConfig(kind="stdin"), stdin=stream)) == ["alpha\nbeta", "gamma", "delta"]


# --- Kafka text topic against a real (Tansu) broker (``kafka_cfg`` from conftest) -------------------------------


def test_kafka_text_topic(kafka_cfg):
    from streamd.stream.kafka import ensure_topic, make_producer

    ensure_topic(kafka_cfg, "texts", 1)
    producer = make_producer(kafka_cfg, max_request_size=2**20)
    texts = ["first document", "zweites Dokument, ü", "third"]
    for t in texts[:2]:
        producer.send("texts", t.encode())
    producer.send("texts", b"\xff\xfe not utf-8")  # skipped with a warning, the stream goes on
    producer.send("texts", texts[2].encode())
    producer.flush()
    producer.close()

    with pytest.raises(SourceError, match="needs the kafka settings"):
        iter_source(SourceConfig(kind="kafka", topic="texts"))
    docs = iter_source(SourceConfig(kind="kafka", topic="texts"), kafka=kafka_cfg)
    assert take(docs, 3) == texts
    docs.close()  # closes the consumer
