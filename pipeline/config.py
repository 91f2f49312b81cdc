"""The partition configuration file: schema, defaults, validation and clear errors."""
from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.codecs import codec_names
from pipeline.devices import check_device_name

__all__ = [
    "CheckpointSection",
    "CloudSection",
    "Config",
    "ConfigError",
    "EdgeSection",
    "LinkSection",
    "ModelSection",
    "PartitionSection",
    "SkipSection",
    "TrainSection",
    "load_config",
    "parse_config",
]

#: The largest gRPC message the configuration may ask for.  Larger cut tensors mean the
#: micro-batch is too big: raise partition.chunks instead.
MAX_MESSAGE_MIB = 1024


class ConfigError(ValueError):
    """The configuration file is invalid; the message names the key and what is allowed."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ModelSection(_Section):
    """`[model]`: which network to build and how to initialise it."""

    name: str = "tinycnn"
    num_classes: int = Field(10, ge=2)
    input_shape: tuple[int, int, int] = (3, 32, 32)
    width: float = Field(1.0, gt=0.0, le=4.0)
    seed: int = 0

    @field_validator("input_shape", mode="before")
    @classmethod
    def _shape_from_list(cls, value: Any) -> Any:
        # TOML has arrays, not tuples.
        return tuple(value) if isinstance(value, list) else value

    @field_validator("input_shape")
    @classmethod
    def _positive_shape(cls, value: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(d <= 0 for d in value):
            raise ValueError("every dimension of input_shape must be positive, e.g. [3, 32, 32]")
        return value


class PartitionSection(_Section):
    """`[partition]`: where the model is cut and how a mini-batch is split."""

    edge_head: int = Field(2, ge=0)
    edge_tail: int = Field(1, ge=0)
    chunks: int = Field(4, ge=1, le=256)


class LinkSection(_Section):
    """`[link]`: how tensors are encoded on the link and how large a message may be."""

    # The codec registry is the one list of names: a codec added there is accepted here.
    uplink: Literal[codec_names("activation")] = "fp32"  # type: ignore[valid-type]
    downlink: Literal[codec_names("activation")] = "fp32"  # type: ignore[valid-type]
    gradients: Literal[codec_names("gradient")] = "fp32"  # type: ignore[valid-type]
    max_message_mib: int = Field(64, ge=1, le=MAX_MESSAGE_MIB)
    timeout_seconds: float = Field(120.0, gt=0)
    # Edge only (left out of agreed()): how long the edge keeps retrying a lost cloud before
    # it gives up; 0 gives up at once.
    reconnect_seconds: float = Field(120.0, ge=0)
    # Once the head is frozen, the cloud keeps each training sample's activation and the edge
    # sends only the sample's index the next times (the activation of a frozen head never changes).
    cache_frozen: bool = False

    @model_validator(mode="after")
    def _cache_keeps_exactness(self) -> LinkSection:
        if self.cache_frozen and self.uplink not in CACHEABLE_CODECS:
            raise ValueError(
                f"cache_frozen needs an uplink codec that encodes each value on its own "
                f"({', '.join(CACHEABLE_CODECS)}): {self.uplink} scales a micro-batch as a whole, so a "
                "cached sample would decode differently than in the micro-batch it comes in next"
            )
        return self


#: Uplink codecs whose bytes for one sample do not depend on the rest of its micro-batch.
CACHEABLE_CODECS = ("fp32", "bf16")

SkipPolicyName = Literal["none", "manual", "cac-auto", "lars", "norm-ema", "schedule"]

#: Which `[skip]` keys each policy reads; a key set for a policy that ignores it is an error,
#: because a silently ignored knob is worse than none.
_POLICY_KEYS: dict[str, frozenset[str]] = {
    "none": frozenset(),
    "manual": frozenset({"stop_layers", "stop_steps", "braking_distance"}),
    "cac-auto": frozenset(
        {"start_step", "start_thr", "mt_count_thr", "mt_thr", "slope_thr", "samples", "braking_distance"}
    ),
    "lars": frozenset({"alpha", "full_every", "granularity"}),
    "norm-ema": frozenset({"alpha", "shift", "ema"}),
    "schedule": frozenset({"schedule", "c1", "c2"}),
}
_COMMON_SKIP_KEYS = frozenset({"policy", "max_boundary", "prefix", "record"})


class SkipSection(_Section):
    """`[skip]`: the skip controller's policy and its parameters."""

    policy: SkipPolicyName = "none"
    max_boundary: int | None = Field(None, ge=0)
    # "local": once the boundary covers the edge head, the head learns on from an edge-side
    # auxiliary classifier (pipeline.local_learning) instead of staying frozen
    prefix: Literal["freeze", "local"] = "freeze"
    # write the statistics the policy reads to skip_stats.jsonl, for `edgepipe skip replay`
    record: bool = False
    # manual
    stop_layers: list[int] = Field(default_factory=list)
    stop_steps: list[int] = Field(default_factory=list)
    # cac-auto (defaults are CAC Gradient-Skip's)
    start_step: int = Field(5000, ge=0)
    start_thr: float = Field(0.95, allow_inf_nan=False)  # <= 0: Auto never stops (CAC's -1)
    mt_count_thr: int = Field(5, ge=0)
    mt_thr: float = Field(0.96, gt=0.0)
    slope_thr: float = Field(0.98, gt=0.0)
    samples: int | None = Field(None, ge=1)  # None: the braking distance when set, else 200 (CAC's)
    braking_distance: int = Field(0, ge=0)
    # lars (alpha default 2) and norm-ema (alpha default 0.3)
    alpha: float | None = Field(None, gt=0.0)
    full_every: int | None = Field(None, ge=1)
    granularity: Literal["layer", "conv"] = "layer"  # lars: nw per layer or per convolution kernel
    shift: int | None = Field(None, ge=1)
    ema: float = Field(0.9, ge=0.0, lt=1.0)
    # schedule
    schedule: Literal["linear", "quadratic", "exponential"] = "quadratic"
    c1: int | None = Field(None, ge=0)
    c2: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _keys_fit_policy(self) -> SkipSection:
        allowed = _POLICY_KEYS[self.policy] | _COMMON_SKIP_KEYS
        stray = sorted(self.model_fields_set - allowed)
        if stray:
            raise ValueError(
                f"key(s) {', '.join(stray)} are not used by policy {self.policy!r}; "
                f"it reads: {', '.join(sorted(allowed)) or 'nothing'}"
            )
        if len(self.stop_layers) != len(self.stop_steps):
            raise ValueError("stop_layers and stop_steps must have the same length")
        if any(s < 0 for s in self.stop_steps) or any(layer < 0 for layer in self.stop_layers):
            raise ValueError("stop_layers and stop_steps must be non-negative")
        return self


class TrainSection(_Section):
    """`[train]`: data, optimiser and length of the run (read by the edge, agreed with the cloud)."""

    dataset: str = "digits"
    batch_size: int = Field(64, ge=1, le=65536)
    epochs: int = Field(3, ge=1)
    max_steps: int | None = Field(None, ge=1)
    lr: float = Field(0.05, gt=0.0)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(5e-4, ge=0.0)
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    eval_batch_size: int | None = Field(None, ge=1)

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, value: str) -> str:
        if value in ("digits", "synthetic") or value.startswith("cifar10:"):
            return value
        raise ValueError('allowed: "digits", "synthetic" or "cifar10:DIR" (the CIFAR-10 binary version)')


class CheckpointSection(_Section):
    """`[checkpoint]`: how often both sides save their half of a checkpoint and how many they keep."""

    every_steps: int = Field(50, ge=1)
    # A side's newest checkpoint counts only once the other side has it too, so the one
    # before it must stay: at least 2.
    keep: int = Field(2, ge=2)


class _NodeSection(_Section):
    # Where this node's stages compute; each node reads only its own, so it is left out of agreed().
    device: str = "cpu"

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        return check_device_name(value)


class CloudSection(_NodeSection):
    """`[cloud]`: where the cloud's middle stage computes (``--device`` on edgepipe-cloud wins),
    and how much memory each session's activation cache (``[link] cache_frozen``) may take before
    it spills to disk."""

    cache_memory_mib: int = Field(256, ge=0)


class EdgeSection(_NodeSection):
    """`[edge]`: where the edge's head and tail compute (``--device`` on edgepipe-edge wins)."""


FederationMode = Literal["none", "splitfed-v1", "splitfed-v2"]


class FederationSection(_Section):
    """`[federation]`: one cloud training with many edges (SplitFed), or each edge on its own middle.

    ``none``: every edge gets a private middle. ``splitfed-v1``: a middle per edge, all trained
    in parallel and averaged with the edges' heads and tails every ``sync_every`` steps.
    ``splitfed-v2``: one middle shared by every edge's steps in the order the cloud admits them,
    heads and tails averaged every ``sync_every`` steps. A round also ends at every epoch end.
    """

    mode: FederationMode = "none"
    edges: int = Field(2, ge=1, le=1024)
    sync_every: int = Field(1, ge=1)
    round_timeout_seconds: float = Field(300.0, gt=0)

    @model_validator(mode="after")
    def _keys_fit_mode(self) -> FederationSection:
        # A default value is no knob set (to_dict writes every key): only a changed one is stray.
        defaults = {name: field.default for name, field in FederationSection.model_fields.items()}
        stray = sorted(k for k in self.model_fields_set - {"mode"} if getattr(self, k) != defaults[k])
        if self.mode == "none" and stray:
            raise ValueError(
                f"key(s) {', '.join(stray)} are only read by a split-federated mode; "
                'set mode = "splitfed-v1" or "splitfed-v2", or remove them'
            )
        return self


class Config(_Section):
    """A whole configuration file."""

    model: ModelSection = Field(default_factory=ModelSection)
    partition: PartitionSection = Field(default_factory=PartitionSection)
    link: LinkSection = Field(default_factory=LinkSection)
    skip: SkipSection = Field(default_factory=SkipSection)
    train: TrainSection = Field(default_factory=TrainSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    federation: FederationSection = Field(default_factory=FederationSection)
    cloud: CloudSection = Field(default_factory=CloudSection)
    edge: EdgeSection = Field(default_factory=EdgeSection)

    @model_validator(mode="after")
    def _chunks_fit_batch(self) -> Config:
        if self.partition.chunks > self.train.batch_size:
            raise ValueError(
                f"partition.chunks ({self.partition.chunks}) exceeds train.batch_size "
                f"({self.train.batch_size}): every micro-batch needs at least one sample"
            )
        return self

    @model_validator(mode="after")
    def _cache_has_a_frozen_head(self) -> Config:
        if self.link.cache_frozen and self.skip.prefix != "freeze":
            raise ValueError(
                'link.cache_frozen needs skip.prefix = "freeze": a head that keeps learning locally '
                "changes its activations every step"
            )
        if self.link.cache_frozen and self.federation.mode != "none":
            raise ValueError("link.cache_frozen is not available in a split-federated run yet; set it to false")
        return self

    @model_validator(mode="after")
    def _local_learning_has_a_head(self) -> Config:
        if self.skip.prefix != "local":
            return self
        if self.partition.edge_head == 0:
            raise ValueError(
                'skip.prefix = "local" trains the edge head locally once it is frozen, but partition.edge_head '
                'is 0 (no head): set edge_head >= 1 or prefix = "freeze"'
            )
        if self.federation.mode != "none":
            raise ValueError(
                f'skip.prefix = "local" gives each edge a head that learns on its own classifier, which '
                f'federation.mode = "{self.federation.mode}" would average: use prefix = "freeze"'
            )
        return self

    @model_validator(mode="after")
    def _schedule_starts_in_time(self) -> Config:
        # Only the schedule policy reads c2 (the stray-key check refuses it elsewhere).
        if self.skip.policy == "schedule" and self.skip.c2 >= self.train.epochs:
            raise ValueError(
                f"skip.c2 ({self.skip.c2}) is the epoch freezing starts: "
                f"make it smaller than train.epochs ({self.train.epochs})"
            )
        return self

    @property
    def micro_batch_size(self) -> int:
        """The largest micro-batch any frame may carry (training and evaluation)."""
        train = -(-self.train.batch_size // self.partition.chunks)
        return max(train, self.train.eval_batch_size or train)

    def to_dict(self) -> dict[str, Any]:
        """Every setting, defaults filled in, in a form :func:`parse_config` reads back.

        ``[skip]`` keeps only the keys its policy reads.
        """
        data = self.model_dump(mode="json")
        used = _POLICY_KEYS[self.skip.policy] | _COMMON_SKIP_KEYS
        data["skip"] = {k: v for k, v in data["skip"].items() if k in used}
        return data

    def to_toml(self) -> str:
        """:meth:`to_dict` as a TOML configuration file that :func:`load_config` reads back.

        Unset optional keys (``None``) are left out: TOML has no null, and a missing key takes
        the same default.
        """
        data = {
            section: {key: value for key, value in table.items() if value is not None}
            for section, table in self.to_dict().items()
        }
        return tomli_w.dumps(data)

    def agreed(self) -> dict[str, Any]:
        """The part of the configuration edge and cloud must share.

        Everything but where the edge's data lives, how long the edge retries a lost cloud and
        the devices each side computes on.
        """
        data = self.to_dict()
        data["train"].pop("dataset")
        data["link"].pop("reconnect_seconds")
        data.pop("cloud")
        data.pop("edge")
        return data


def _describe(error: dict[str, Any], data: dict[str, Any]) -> str:
    loc = [str(part) for part in error["loc"]]
    kind = error["type"]
    if kind == "extra_forbidden":
        parent: Any = Config
        for part in loc[:-1]:
            parent = parent.model_fields[part].annotation
        allowed = ", ".join(parent.model_fields)
        if len(loc) == 1:
            return f"[{loc[0]}]: unknown section; allowed sections: {allowed}"
        return f"{'.'.join(loc)}: unknown key; allowed keys in [{loc[0]}]: {allowed}"
    where = ".".join(loc) if loc else "config"
    message = error["msg"].removeprefix("Value error, ")
    if "input" in error and loc and not isinstance(error["input"], dict) and kind != "missing":
        return f"{where}: {message} (got {error['input']!r})"
    # A check across sections names its keys in the message itself.
    return f"{where}: {message}" if loc else message


def parse_config(data: dict[str, Any], source: str = "config") -> Config:
    """Validate a configuration given as nested dicts (as read from TOML)."""
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        problems = "\n  ".join(_describe(e, data) for e in exc.errors())
        raise ConfigError(f"{source}: invalid configuration:\n  {problems}") from None


def load_config(path: str | Path) -> Config:
    """Read and validate a TOML configuration file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {exc.start} is 0x{exc.object[exc.start]:02x}); save it as UTF-8"
        ) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_config(data, str(path))
