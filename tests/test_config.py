"""load_config's layers: defaults < YAML file < environment < --set, validated once, together."""

from __future__ import annotations

import pytest

from streamd.config import ConfigError, load_config


def test_a_combination_split_between_environment_and_file_is_valid(tmp_path, monkeypatch):
    """The SASL mechanism in the environment, protocol, user and password in the file: valid only together."""
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("kafka:\n  security: {protocol: SASL_SSL, sasl_username: u, sasl_password: pw}\n")
    monkeypatch.setenv("STREAMD_KAFKA__SECURITY__SASL_MECHANISM", "PLAIN")
    sec = load_config(cfg_file).kafka.security
    assert (sec.protocol, sec.sasl_mechanism, sec.sasl_username) == ("SASL_SSL", "PLAIN", "u")
    assert sec.sasl_password.get_secret_value() == "pw"


def test_precedence_and_errors_of_the_environment_layer(tmp_path, monkeypatch):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("checkpoints: {keep_last: 2, every_tokens: 100}\nkafka: {topic: from-file}\n")
    monkeypatch.setenv("STREAMD_CHECKPOINTS__KEEP_LAST", "5")
    monkeypatch.setenv("STREAMD_KAFKA__BOOTSTRAP_SERVERS", "a:1,b:2")
    cfg = load_config(cfg_file, sets=["checkpoints.every_tokens=300"])
    assert (cfg.checkpoints.keep_last, cfg.checkpoints.every_tokens) == (5, 300)  # env > file; --set > file
    assert cfg.kafka.bootstrap_servers == ["a:1", "b:2"] and cfg.kafka.topic == "from-file"
    assert load_config(cfg_file, sets=["checkpoints.keep_last=7"]).checkpoints.keep_last == 7  # --set > env
    monkeypatch.setenv("STREAMD_CHECKPOINTS__KEEP_LAST", "0")
    with pytest.raises(ConfigError, match="checkpoints.keep_last"):
        load_config(cfg_file)
    monkeypatch.setenv("STREAMD_CHECKPOINTS__KEEP_LAST", "3")
    monkeypatch.setenv("STREAMD_TRAINER__SAES", "[not json")
    with pytest.raises(ConfigError, match="environment"):
        load_config(cfg_file)
