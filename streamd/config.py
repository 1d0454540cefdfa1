"""Typed configuration for every streamd component.

One YAML file, then environment overrides (``STREAMD_<SECTION>__<FIELD>``), then CLI flags; validated once at the
edge so a bad field stops the process before anything starts, with the field's path and the allowed values.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    SecretStr,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings, EnvSettingsSource, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError,
)

if TYPE_CHECKING:
    from streamd.sae.base import SAE

Site = Literal["resid_post", "mlp_out", "attn_out"]
ModelDType = Literal["float32", "bfloat16", "float16"]
# The producer's compute dtype may also be "auto" (torch_utils.resolve_dtype: bfloat16 where the device computes it
# natively, float32 elsewhere).
ComputeDType = Literal["auto", "float32", "bfloat16", "float16"]
DEFAULT_ARCHITECTURE = "topk"  # of an SAE config without ``architecture``


class Strict(BaseModel):
    """Base for config sections: unknown keys are errors (a typo must not silently fall back to a default)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class KafkaSecurity(Strict):
    """Passed through to kafka-python (SASL / TLS); see ``streamd.stream.kafka.client_kwargs``."""

    protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER", "GSSAPI"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    ssl_password: SecretStr | None = None
    ssl_check_hostname: bool = True

    @model_validator(mode="after")
    def _sasl_complete(self) -> KafkaSecurity:
        if self.protocol.startswith("SASL") and self.sasl_mechanism is None:
            raise ValueError(f"security.protocol={self.protocol} needs security.sasl_mechanism")
        if self.sasl_mechanism in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512") and not (
            self.sasl_username and self.sasl_password
        ):
            raise ValueError(f"sasl_mechanism={self.sasl_mechanism} needs sasl_username and sasl_password")
        return self


class KafkaConfig(Strict):
    # NoDecode: from the environment, "host:9092,host2:9092" is split by _split rather than parsed as JSON.
    bootstrap_servers: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["127.0.0.1:9092"], min_length=1
    )
    topic: str = Field("streamd.activations", pattern=r"^[A-Za-z0-9._-]{1,249}$")
    partitions: int = Field(4, ge=1, le=1024, description="used when streamd creates the topic")
    replication_factor: int = Field(1, ge=1)
    session_timeout_ms: int = Field(6000, ge=1000, description="group join takes about half of this")
    request_timeout_ms: int = Field(30000, ge=1000)
    security: KafkaSecurity = Field(default_factory=KafkaSecurity)
    generation_seconds: int | None = Field(
        None, ge=1, description="write to TOPIC.gNNNNNNNNNN, a new topic every this many seconds, so the trainer can "
        "delete generations it has trained and checkpointed (bounded broker footprint without broker retention); "
        "at least the generation grace (delivery_timeout_ms + clock_skew_seconds)",
    )
    delivery_timeout_ms: int = Field(
        120_000, ge=1000, description="how long a producer's send is retried before it moves to the current topic: "
        "a record may land on a generation this long after the producer left it",
    )
    clock_skew_seconds: int = Field(
        30, ge=0, description="how far a producer's clock may be ahead of or behind the trainer's",
    )

    @property
    def generation_grace_seconds(self) -> float:
        """How long after a generation ended by the trainer's clock a record may still land on it."""
        return self.delivery_timeout_ms / 1000 + self.clock_skew_seconds

    @model_validator(mode="after")
    def _generations_outlast_late_records(self) -> KafkaConfig:
        if self.generation_seconds is not None and self.generation_seconds < self.generation_grace_seconds:
            raise ValueError(
                f"kafka.generation_seconds ({self.generation_seconds}) is shorter than the generation grace "
                f"(kafka.delivery_timeout_ms {self.delivery_timeout_ms} ms + kafka.clock_skew_seconds "
                f"{self.clock_skew_seconds} s = {self.generation_grace_seconds:g} s): a record still retried or sent "
                f"by a skewed clock could land on a retired generation; raise generation_seconds or lower the others")
        return self

    @field_validator("bootstrap_servers", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        return [s.strip() for s in v.split(",") if s.strip()] if isinstance(v, str) else v

    @field_validator("bootstrap_servers")
    @classmethod
    def _host_port(cls, v: list[str]) -> list[str]:
        for s in v:
            host, _, port = s.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"bootstrap server {s!r} is not HOST:PORT")
        return v


class SiteSpec(Strict):
    """Where activations are captured: ``site`` of block ``layer`` (0-based; resid_post of L = output of block L)."""

    site: Site = "resid_post"
    layer: int = Field(15, ge=0)
    topic: str | None = Field(None, description="topic for this site; default: kafka.topic")

    @property
    def hook_name(self) -> str:
        """The TransformerLens / SAELens hook name of this site."""
        return f"blocks.{self.layer}.hook_{self.site}"


class SourceConfig(Strict):
    kind: Literal["corpus", "files", "stdin", "kafka", "hf"] = "corpus"
    corpus: Literal["kjv", "fortunes", "pydoc"] = "kjv"
    paths: list[str] = Field(default_factory=list, description="files or globs (.txt, .jsonl) for kind=files")
    text_field: str = Field("text", description="the text field of .jsonl lines and the text column of kind=hf")
    topic: str | None = Field(None, description="Kafka topic of UTF-8 text for kind=kafka (what `streamd feed` "
                              "publishes)")
    group_id: str | None = Field(None, min_length=1, description="kind=kafka: the consumer group the producers "
                                 "share (Kafka divides the text topic among them); default streamd-source.TOPIC")
    idle_exit_seconds: float | None = Field(None, gt=0, description="kind=kafka: end the source after this long "
                                            "without a document (default: wait for ever)")
    loop: bool = Field(False, description="restart the source when it ends instead of stopping")
    # kind=hf (Hugging Face datasets, the [hf] extra)
    dataset: str | None = Field(None, description="kind=hf: a dataset saved with save_to_disk, a directory or "
                                "file(s) of parquet / arrow / json / csv, or a builder name (e.g. parquet, with "
                                "data_files); nothing is downloaded when HF_HUB_OFFLINE=1")
    data_files: list[str] = Field(default_factory=list, description="kind=hf: data files for load_dataset")
    split: str = "train"
    streaming: bool = Field(False, description="kind=hf: iterate without materialising the dataset")
    input_ids_field: str | None = Field(None, description="kind=hf: a pretokenized column of token ids to use "
                                        "instead of text_field (checked against the tokenizer's vocabulary)")
    shuffle_buffer: int | None = Field(None, ge=1, description="kind=hf: shuffle with a buffer of this many rows")
    seed: int = 0

    @model_validator(mode="after")
    def _needs(self) -> SourceConfig:
        if self.kind == "files" and not self.paths:
            raise ValueError("source.kind=files needs source.paths")
        if self.kind == "kafka" and not self.topic:
            raise ValueError("source.kind=kafka needs source.topic")
        if self.kind == "hf" and not self.dataset:
            raise ValueError("source.kind=hf needs source.dataset (a local path or a builder name)")
        return self

    @property
    def kafka_group(self) -> str:
        return self.group_id or f"streamd-source.{self.topic}"


class ShardConfig(Strict):
    """Direct sharding of a source not fed through a topic: this producer reads every ``count``-th document,
    starting at ``index`` (also from STREAMD_PRODUCER__SHARD__INDEX / __COUNT)."""

    index: int = Field(0, ge=0)
    count: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _index_below_count(self) -> ShardConfig:
        if self.index >= self.count:
            raise ValueError(f"producer.shard.index ({self.index}) must be below producer.shard.count ({self.count})")
        return self


class FeedConfig(Strict):
    """`streamd feed`: a text source -> the text topic that producers share (``source.kind: kafka``)."""

    source: SourceConfig = Field(default_factory=SourceConfig)
    topic: str = Field("streamd.text", pattern=r"^[A-Za-z0-9._-]{1,249}$")
    partitions: int = Field(16, ge=1, le=1024, description="at least the most producers you will run")
    group_id: str | None = Field(None, description="the producers' consumer group whose lag throttles the feeder; "
                                 "default streamd-source.TOPIC (the producers' default)")
    max_lag: int | None = Field(10_000, ge=1, description="wait while more documents than this are in the topic "
                                "and not yet committed by the producers' group; null: never wait")
    state_path: Path | None = Field(None, description="file of the feeder's position (epoch, next document), "
                                    "written after the broker acknowledged; a restarted feeder continues there")
    commit_every_seconds: float = Field(1.0, gt=0, description="how often the position is written")
    shuffle: bool = Field(True, description="with source.loop: every epoch is a permutation by seed + epoch")
    seed: int = 0
    holdout_fraction: float = Field(0.0, ge=0, lt=1, description="documents held back for evaluation, chosen "
                                    "by a hash of their text (never published)")
    holdout_path: Path | None = Field(None, description="append held-out documents here (JSONL: doc, text)")
    max_documents: int | None = Field(None, ge=1, description="stop after publishing this many")
    metrics_port: int = Field(9402, ge=0, le=65535)
    lock_ttl_seconds: float = Field(6.0, gt=0, description="a feeder whose lock heartbeat is older than this is "
                                    "dead; a second feeder on a topic with a live one refuses to start")


class ProducerConfig(Strict):
    model_path: str | None = Field(None, description="HF directory or .gguf file; None = shipped SmolLM2-135M")
    dtype: ComputeDType = Field("float32", description="the model's compute dtype; auto: bfloat16 on a CUDA device "
                                "or a CPU with native bf16 (AVX512-BF16, AMX), float32 elsewhere")
    wire_dtype: ModelDType = "float16"
    sites: list[SiteSpec] = Field(default_factory=lambda: [SiteSpec()], min_length=1)
    context_length: int = Field(128, ge=2, le=32768)
    skip_positions: int = Field(
        1, ge=0, description="token policy: the first positions after a window's leading BOS are never published "
        "(massive-activation tokens inherit the attention sink there); a window that continues a document repeats "
        "the previous window's last tokens there as context, so no token is lost. 0: off")
    outlier_factor: float | None = Field(
        8.0, gt=1, description="token policy: a token whose norm is above this many times the site's running median "
        "norm is not published (streamd_outlier_tokens_total{reason=\"norm\"}). null: off")
    batch_size: int = Field(8, ge=1)
    source: SourceConfig = Field(default_factory=SourceConfig)
    shard: ShardConfig = Field(default_factory=ShardConfig)
    producer_id: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}", max_length=255)
    max_message_bytes: int = Field(1_000_000, ge=4096, le=128 * 2**20)
    queue_max_messages: int = Field(64, ge=1, description="bounded send queue; the model waits when full")
    lag_url: str | None = Field(None, description="trainer's base URL; with max_lag_messages, wait for it to keep up")
    max_lag_messages: int | None = Field(None, ge=1, description="most messages published but not yet consumed")
    include_token_ids: bool = True
    torch_threads: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    device: str = "cpu"
    metrics_port: int = Field(9401, ge=0, le=65535)

    @model_validator(mode="after")
    def _skip_fits(self) -> ProducerConfig:
        if self.skip_positions >= self.context_length - 1:
            raise ValueError(f"producer.skip_positions ({self.skip_positions}) must be below context_length - 1 "
                             f"({self.context_length - 1}): a window needs a position to publish")
        return self


class SAEConfig(Strict):
    """One SAE of a run; several may train on the same batches (a sweep).

    This class holds the fields every SAE has. Each architecture subclasses it in its own file under
    ``streamd/sae/`` with its parameters and declarations (default lr, loss terms, export; see ``streamd.sae``), and
    is looked up by ``architecture`` in the registry ``streamd.sae.ARCHITECTURES``: ``SAEConfig(**fields)`` and
    ``SAEConfig.model_validate(fields)`` return that subclass (no ``architecture`` means topk), and so does every
    entry of ``trainer.saes``. A field of another architecture is an error that names it.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}$", description="also a directory name")
    architecture: str = Field(DEFAULT_ARCHITECTURE, description="a registered architecture (streamd.sae.ARCHITECTURES)")
    expansion_factor: int = Field(8, ge=1)
    d_sae: int | None = Field(None, ge=1, description="overrides expansion_factor")
    lr: float | None = Field(None, gt=0, description="default: the architecture's default_lr (topk, batchtopk: "
                              "2e-4 / sqrt(d_sae / 16384); relu, jumprelu: 5e-5)")
    seed: int = 0
    grad_clip: float = Field(1.0, gt=0)

    # --- what each architecture declares (class attributes and methods of its subclass) -------------------------
    # its LossOut.terms keys -> the ``term`` label of the streamd_loss metric (total, mse, sparsity, auxk, or new)
    loss_terms: ClassVar[Mapping[str, str]] = {"mse": "mse"}
    # the SAELens architecture it exports as ("standard", "topk", "jumprelu", ...)
    export_as: ClassVar[str]
    # the streamd architecture that loads such an export back; None: this one
    export_loaded_by: ClassVar[str | None] = None

    def default_lr(self, d_in: int) -> float:
        """The learning rate when ``lr`` is not set."""
        raise NotImplementedError(f"architecture {self.architecture} declares no default_lr")

    @classmethod
    def module(cls) -> type[SAE]:
        """The ``streamd.sae.base.SAE`` subclass that trains this architecture (imports torch)."""
        raise NotImplementedError(f"{cls.__name__} declares no module")

    @classmethod
    def from_export(cls, saelens_cfg: dict[str, Any], d_sae: int) -> SAEConfig:
        """The config of an SAE loaded back from an export (``cfg.json``) this architecture loads."""
        return cls(name="exported", d_sae=d_sae)

    # --- common -------------------------------------------------------------------------------------------------

    def width(self, d_in: int) -> int:
        return self.d_sae or self.expansion_factor * d_in

    def learning_rate(self, d_in: int) -> float:
        """The lr this SAE trains with: ``lr``, else its architecture's default."""
        return self.lr if self.lr is not None else self.default_lr(d_in)

    # --- dispatch on ``architecture`` through the registry --------------------------------------------------------

    def __new__(cls, *args: Any, **data: Any) -> SAEConfig:
        if cls is SAEConfig:  # SAEConfig(architecture="relu", ...) is a ReLU config
            cls = _config_class(data)
        return super().__new__(cls)

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> SAEConfig:  # type: ignore[override]
        if cls is SAEConfig and isinstance(obj, Mapping):
            cls = _config_class(obj)
        return super(SAEConfig, cls).model_validate(obj, **kwargs)

    @model_validator(mode="before")
    @classmethod
    def _fields_of_this_architecture(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        archs = _architectures()
        if cls is SAEConfig:  # reached only when no registered architecture matched
            raise ValueError(f"architecture {data.get('architecture')!r} is not registered; "
                             f"expected one of {', '.join(archs)}")
        arch = cls.model_fields["architecture"].default
        problems = []
        for key in data:
            owners = [a for a, c in archs.items() if key in c.model_fields]
            if key not in cls.model_fields and owners:
                problems.append(f"{key} is not a field of architecture {arch} (it belongs to {', '.join(owners)})")
        if problems:
            raise ValueError("; ".join(problems))
        return data


def _architectures() -> Mapping[str, type[SAEConfig]]:
    """The registry (imported on first use: the architecture files import this module, and none imports torch)."""
    from streamd.sae import ARCHITECTURES

    return ARCHITECTURES


def _config_class(data: Mapping[str, Any]) -> type[SAEConfig]:
    """The registered class of ``data["architecture"]``; SAEConfig itself (whose validation fails) if none is."""
    arch = data.get("architecture", DEFAULT_ARCHITECTURE)
    return _architectures().get(arch, SAEConfig) if isinstance(arch, str) else SAEConfig


def _sae_config(value: Any) -> SAEConfig:
    if isinstance(value, SAEConfig):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(f"an SAE is a mapping of fields (name, architecture, ...), got {type(value).__name__}")
    return SAEConfig.model_validate(value)


# A field holding any registered architecture's config: validated by the architecture's class, dumped with its fields.
AnySAEConfig = Annotated[SerializeAsAny[SAEConfig], PlainValidator(_sae_config, json_schema_input_type=dict)]


class TrainerConfig(Strict):
    group_id: str | None = Field(
        None, min_length=1, description="Kafka consumer group; default: derived from the run directory on its first "
        "start and recorded there (RUN/group_id), so every run has its own and a resumed run keeps it",
    )
    site: SiteSpec = Field(default_factory=SiteSpec)
    site_id: str | None = Field(None, description="hex site id to accept; default: computed from model + site")
    model_path: str | None = Field(None, description="model whose site_id to expect; None = shipped default")
    d_in: int | None = Field(None, ge=1, description="expected d_model; default: from the first message")
    buffer_tokens: int = Field(2**20, ge=64)
    buffer_dtype: ModelDType = "float32"
    max_token_age_buffers: float = Field(
        8.0, ge=1, description="a token older than this many buffer-fulls is trained next (bounds re-reads)"
    )
    batch_size: int = Field(4096, ge=1)
    device: str = "auto"
    autocast_bf16: bool = False
    sparse_step: bool = Field(True, description="TopK-family SAEs train with the sparse step (streamd.sae.sparse); "
                              "false: the dense autograd path it is tested against")
    compile: bool = Field(False, description="the sparse step's encoder matmul and top-k selection run through "
                          "torch.compile; where the host cannot compile (no C++ compiler), eager after one warning")
    triton_decoder: Literal["auto", "on", "off"] = Field(
        "auto", description="the sparse step's decoder products as Triton kernels (streamd.sae.triton_decoder): "
        "auto: on a CUDA device where triton imports; on: required (an error at start otherwise); off: torch's CSR "
        "kernels")
    saes: list[AnySAEConfig] = Field(default_factory=lambda: [SAEConfig(name="topk-k32")], min_length=1)
    warmup_tokens: int = Field(1_000_000, ge=0, description="lr and sparsity-penalty warm-up")
    max_tokens: int | None = Field(None, ge=1, description="stop after this many; enables lr decay")
    decay_fraction: float = Field(0.2, ge=0, le=1, description="last fraction of max_tokens with linear lr decay")
    norm_estimate_tokens: int = Field(32768, ge=1)
    outlier_factor: float | None = Field(
        8.0, gt=1, description="a token whose norm is above this many times the running median norm is dropped "
        "before the held-out set and the buffer (activations streamd's producer did not filter: replayed files, "
        "other producers), and the scale comes from the mean norm of the tokens below it "
        "(streamd_outlier_tokens_total{reason=\"norm\"}). null: off, scale from the plain mean norm")
    dead_window_tokens: int = Field(10_000_000, ge=1)
    dense_threshold: float = Field(0.1, gt=0, le=1)
    density_window_tokens: int = Field(1_000_000, ge=1)
    stats_window_tokens: int = Field(1_000_000, ge=1, description="FVU, MSE, L0 and loss terms are reported over "
                                     "about this many recent tokens (whole steps), not the last batch")
    eval_every_tokens: int = Field(1_000_000, ge=1)
    eval_tokens: int = Field(8192, ge=0, description="held-out activations kept from the first messages")
    run_dir: Path = Path("runs/default")
    torch_threads: int | None = Field(None, ge=1)
    history_max_bytes: int = Field(50_000_000, ge=10_000)
    trace_file: Path | None = Field(None, description="debug: append the origin of every trained token (JSONL)")
    collective_timeout_seconds: float = Field(
        120.0, gt=0, description="data-parallel: a collective the other ranks do not join within this long (a "
        "rank died or hangs) stops every rank with an error; the last good checkpoint stays on disk")

    @model_validator(mode="after")
    def _names_unique(self) -> TrainerConfig:
        names = [s.name for s in self.saes]
        if len(set(names)) != len(names):
            raise ValueError(f"trainer.saes names must be unique, got {names}")
        if self.batch_size > self.buffer_tokens:
            raise ValueError(f"trainer.batch_size ({self.batch_size}) exceeds buffer_tokens ({self.buffer_tokens})")
        return self


class MetricsConfig(Strict):
    host: str = "127.0.0.1"
    port: int = Field(9400, ge=0, le=65535)
    tls_certfile: Path | None = None
    tls_keyfile: Path | None = None
    checkpoint_token: SecretStr | None = Field(None, description="bearer token required on /checkpoints")
    http_workers: int = Field(16, ge=1, le=1024, description="threads serving HTTP connections")
    http_max_connections: int = Field(64, ge=1, le=65536, description="connections held at once; beyond: 503")
    http_header_timeout_seconds: float = Field(10.0, gt=0, description="deadline for a request's line and headers")

    @model_validator(mode="after")
    def _tls_pair(self) -> MetricsConfig:
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise ValueError("metrics.tls_certfile and metrics.tls_keyfile go together")
        if self.http_max_connections < self.http_workers:
            raise ValueError("metrics.http_max_connections must be at least metrics.http_workers")
        return self


class CheckpointConfig(Strict):
    every_tokens: int | None = Field(10_000_000, ge=1)
    every_seconds: float | None = Field(600.0, gt=0)
    keep_last: int = Field(3, ge=1)
    retry_seconds: float = Field(10.0, gt=0, description="after a failed checkpoint (a full disk) the next is tried "
                                 "this long after, doubling with each failure in a row up to retry_max_seconds")
    retry_max_seconds: float = Field(600.0, gt=0)

    @model_validator(mode="after")
    def _retry_range(self) -> CheckpointConfig:
        if self.retry_max_seconds < self.retry_seconds:
            raise ValueError(f"checkpoints.retry_max_seconds ({self.retry_max_seconds}) is below "
                             f"checkpoints.retry_seconds ({self.retry_seconds})")
        return self


class InspectConfig(Strict):
    """`streamd inspect` / `streamd features`: feature dashboards and downstream metrics on held-out text."""

    source: SourceConfig | None = Field(None, description="held-out text; default: the feeder's held-out slice "
                                        "(feed.holdout_fraction > 0) of feed.source, else a shipped corpus the "
                                        "producers do not read (pydoc, or kjv when they read pydoc)")
    tokens: int = Field(16384, ge=16, description="tokens of held-out text per inspection (whole windows)")
    every_seconds: float = Field(300.0, gt=0, description="at most one inspection per this many seconds")
    poll_seconds: float = Field(10.0, gt=0, description="how often the followed trainer is asked for a checkpoint")
    device: str = Field("auto", description="where the model and SAEs run (auto: a GPU when there is one)")
    top_n: int = Field(10, ge=1, le=256, description="top-activating contexts kept per latent")
    context_window: int = Field(8, ge=0, le=64, description="tokens shown on each side of an example's token")
    intervals: int = Field(4, ge=1, le=16, description="equal activation intervals sampled per latent")
    per_interval: int = Field(3, ge=1, le=64, description="contexts sampled from each interval")
    histogram_bins: int = Field(24, ge=2, le=256)
    logit_tokens: int = Field(10, ge=1, le=100, description="tokens listed for the raised and lowered logits")
    max_latents: int = Field(4096, ge=1, description="latents with a dashboard; beyond, a sample plus the densest "
                             "and rarest")
    extremes: int = Field(256, ge=0, description="densest and rarest latents always shown when sampling")
    seed: int = 0
    out_dir: Path = Field(Path("runs/inspect"), description="dashboards (JSON) of the last inspection and the "
                          "pulled checkpoints")
    host: str = "127.0.0.1"
    port: int = Field(9403, ge=0, le=65535, description="the feature browser, its JSON API and /metrics")
    token: SecretStr | None = Field(None, description="bearer token required on the browser and API pages")
    tls_certfile: Path | None = None
    tls_keyfile: Path | None = None

    @model_validator(mode="after")
    def _tls_pair(self) -> InspectConfig:
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise ValueError("inspect.tls_certfile and inspect.tls_keyfile go together")
        return self


class StreamdConfig(BaseSettings):
    """The whole configuration. Precedence: CLI flags > environment > YAML file > defaults."""

    model_config = SettingsConfigDict(env_prefix="STREAMD_", env_nested_delimiter="__", extra="forbid")

    kafka: KafkaConfig = Field(default_factory=KafkaConfig)
    producer: ProducerConfig = Field(default_factory=ProducerConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    checkpoints: CheckpointConfig = Field(default_factory=CheckpointConfig)
    feed: FeedConfig = Field(default_factory=FeedConfig)
    inspect: InspectConfig = Field(default_factory=InspectConfig)
    producer_count: int = Field(1, ge=1, le=64, description="streamd up: producer processes; above 1 they divide "
                                "a text topic a feeder thread fills from producer.source")
    up_inspector: bool = Field(True, description="streamd up: also run an inspector process (the feature browser on "
                               "inspect.port) following the run's checkpoints")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # init holds YAML merged with CLI overrides (see load_config); the environment sits between them.
        return (init_settings, env_settings)


class ConfigError(ValueError):
    """A configuration problem, phrased for the user: which field, what was given, what is allowed."""


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        tree = tree.setdefault(p, {})
        if not isinstance(tree, dict):
            raise ConfigError(f"{dotted}: {p} is set to a value, it cannot also hold fields")
    tree[leaf] = value


def _parse_value(raw: str) -> Any:
    """CLI ``--set a.b=V`` values are YAML scalars/lists: ``4``, ``true``, ``[a, b]``, ``{name: x}``."""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(config)"
        given = e.get("input")
        given_s = "" if isinstance(given, dict) else f" (got {given!r})"
        lines.append(f"  {loc}: {e['msg']}{given_s}")
    return "invalid configuration:\n" + "\n".join(lines)


def load_config(
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    sets: list[str] | None = None,
    defaults: dict[str, Any] | None = None,
) -> StreamdConfig:
    """Build the effective config: ``defaults`` (a command's own, dotted keys), YAML file, env (``STREAMD_...``),
    then ``overrides`` / ``--set k=v``.

    Environment variables sit below the CLI: pydantic-settings gives init data priority, so the environment is
    merged under the CLI layer explicitly here.
    """
    data: dict[str, Any] = {}
    for key, value in (defaults or {}).items():
        _set_path(data, key, value)
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping of sections, got {type(loaded).__name__}")
        data = _deep_merge(data, loaded)
    cli: dict[str, Any] = {}
    for item in sets or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects SECTION.FIELD=VALUE, got {item!r}")
        _set_path(cli, key.strip(), _parse_value(raw))
    for key, value in (overrides or {}).items():
        if value is not None:
            _set_path(cli, key, value)
    try:
        # The environment layer as raw values, not validated alone: a valid combination may be split between the
        # environment and the file (a SASL mechanism in env, its protocol and user in YAML).
        env_only = EnvSettingsSource(StreamdConfig)()
    except SettingsError as e:
        raise ConfigError(f"environment: {e}") from None
    try:
        merged = _deep_merge(_deep_merge(data, env_only), cli)
        return StreamdConfig(**merged)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None


def dump_config(cfg: StreamdConfig) -> str:
    """The effective config as YAML, secrets masked."""
    return yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False)
