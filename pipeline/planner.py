"""The link-aware planner: predict step time and link bytes of every cut, chunk count and codec choice."""
from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate
from typing import Literal

from pipeline.codecs import MIN_CHANNEL_ELEMENTS, Role, payload_bytes
from pipeline.config import Config, parse_config
from pipeline.models import build_configured
from pipeline.partition import make_cuts, profile
from pipeline.profiler import DeviceProfile

__all__ = [
    "CHUNK_CHOICES", "FRAME_OVERHEAD_BYTES", "GRADIENT_CODECS", "RESOURCES", "UPLINK_CODECS",
    "Candidate", "LinkSpec", "PlanError", "plan", "predict",
]  # fmt: skip

RESOURCES = ("edge", "uplink", "cloud", "downlink")
#: The step frame's fields around a tensor's bytes (61 with a 32-character session id) plus gRPC's prefix.
FRAME_OVERHEAD_BYTES = 64
CHUNK_CHOICES = (1, 2, 4, 8, 16)
UPLINK_CODECS = ("fp32", "fp16", "bf16", "int8", "int4")
GRADIENT_CODECS = ("fp32", "int8")
#: Steps simulated back to back; the last one's duration is the steady-state step time.
_SIMULATED_STEPS = 3
#: What wire.message_limit adds to the largest cut frame when it checks link.max_message_mib.
_MESSAGE_SLACK = 64 << 10

Objective = Literal["time", "bytes"]


class PlanError(ValueError):
    """The planner cannot run on these inputs; the message says which and why."""


@dataclass(frozen=True)
class LinkSpec:
    """The link between edge and cloud: rates in megabits (10**6 bits) per second, round trip in ms."""

    up_mbps: float
    down_mbps: float
    rtt_ms: float

    def __post_init__(self) -> None:
        for key, floor in (("up_mbps", "above 0"), ("down_mbps", "above 0"), ("rtt_ms", "of at least 0")):
            value = getattr(self, key)
            number = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            if not number or value < 0 or (value == 0 and key != "rtt_ms"):
                raise PlanError(f"{key} must be a finite number {floor}, got {value!r}")

    def seconds(self, direction: str, nbytes: int) -> float:
        """Time to push ``nbytes`` through ``direction`` (``uplink`` or ``downlink``) at its rate."""
        mbps = self.up_mbps if direction == "uplink" else self.down_mbps
        return nbytes * 8 / (mbps * 1e6)


@dataclass(frozen=True)
class Candidate:
    """One partition, chunk count and codec choice with its predicted step."""

    edge_head: int
    edge_tail: int
    chunks: int
    uplink: str
    downlink: str
    gradients: str
    #: False: the steady state after the skip controller froze the edge head (no head gradients).
    head_trains: bool
    #: Steady-state seconds per step: the simulated pipeline (see ``_simulate``) plus one round trip.
    step_seconds: float
    uplink_bytes: int
    downlink_bytes: int
    #: Seconds each of :data:`RESOURCES` is busy per step; the busiest is the bottleneck.
    busy_seconds: dict[str, float]
    bottleneck: str

    @property
    def total_bytes(self) -> int:
        """Bytes per step, both directions."""
        return self.uplink_bytes + self.downlink_bytes

    def to_config(self, config: Config) -> Config:
        """``config`` with this candidate's partition and codecs, everything else unchanged."""
        data = config.to_dict()
        data["partition"].update(edge_head=self.edge_head, edge_tail=self.edge_tail, chunks=self.chunks)
        data["link"].update(uplink=self.uplink, downlink=self.downlink, gradients=self.gradients)
        return parse_config(data, "planned configuration")


def predict(
    config: Config, edge: DeviceProfile, cloud: DeviceProfile, link: LinkSpec, *, head_trains: bool = True
) -> Candidate:
    """The predicted step of ``config``'s own partition, chunk count and codecs."""
    costs = _Costs(config, edge, cloud)
    p = config.partition
    make_cuts(costs.num_layers, p.edge_head, p.edge_tail)  # a PartitionError naming the keys when impossible
    return costs.evaluate(
        p.edge_head, p.edge_tail, p.chunks, config.link.uplink, config.link.gradients, link, head_trains
    )


def plan(
    config: Config,
    edge: DeviceProfile,
    cloud: DeviceProfile,
    link: LinkSpec,
    *,
    objective: Objective = "time",
    head_trains: bool = True,
    min_edge_head: int = 0,
    min_edge_tail: int = 0,
) -> list[Candidate]:
    """Every feasible candidate for ``config``'s model and batch, best first by ``objective``.

    Enumerates ``edge_head`` and ``edge_tail`` (at least ``min_edge_head`` / ``min_edge_tail``,
    always one cloud layer), ``chunks`` in :data:`CHUNK_CHOICES` up to the batch size, uplink
    codecs :data:`UPLINK_CODECS` and gradient codecs :data:`GRADIENT_CODECS` (only fp32 when
    no gradient crosses the link); the downlink codec stays ``config``'s. A cut whose fp32
    micro-batch would not fit ``link.max_message_mib`` is left out, as startup would refuse it.
    ``objective="time"`` sorts by step time then bytes, ``"bytes"`` by bytes then time.
    """
    if objective not in ("time", "bytes"):
        raise PlanError(f"objective must be 'time' or 'bytes', got {objective!r}")
    costs = _Costs(config, edge, cloud)
    n = costs.num_layers
    for key, value in (("min_edge_head", min_edge_head), ("min_edge_tail", min_edge_tail)):
        if not 0 <= value < n:
            raise PlanError(f"{key} must be 0 to {n - 1} for this {n}-layer model, got {value}")
    if min_edge_head + min_edge_tail > n - 1:
        raise PlanError(f"min_edge_head + min_edge_tail must leave the cloud a layer of the {n}: at most {n - 1}")
    candidates = []
    for head in range(min_edge_head, n):
        for tail in range(min_edge_tail, n - head):
            gradients_cross = tail > 0 or (head > 0 and head_trains)
            for chunks in (c for c in CHUNK_CHOICES if c <= config.train.batch_size):
                if not costs.fits_message_bound(head, tail, chunks):
                    continue
                for uplink in UPLINK_CODECS:
                    for gradients in GRADIENT_CODECS if gradients_cross else ("fp32",):
                        candidates.append(costs.evaluate(head, tail, chunks, uplink, gradients, link, head_trains))
    if not candidates:
        raise PlanError(f"no candidate fits link.max_message_mib = {config.link.max_message_mib}: raise it")
    candidates.sort(key=_sort_key(objective))
    return candidates


def _sort_key(objective: Objective) -> Callable[[Candidate], tuple[float, ...]]:
    def key(c: Candidate) -> tuple[float, ...]:
        first = (c.total_bytes, c.step_seconds) if objective == "bytes" else (c.step_seconds, c.total_bytes)
        codecs = (UPLINK_CODECS.index(c.uplink), GRADIENT_CODECS.index(c.gradients))
        return (*first, c.edge_head, c.edge_tail, c.chunks, *codecs)  # after `first`: only for a stable order

    return key


#: One micro-batch's tasks in dependency order: (resource, seconds, whether it is backward work).
_Chain = list[tuple[str, float, bool]]


class _Costs:
    """Per-layer costs of both sides and the cut shapes of ``config``'s model, for many candidates."""

    def __init__(self, config: Config, edge: DeviceProfile, cloud: DeviceProfile) -> None:
        self.config = config
        self.layers = profile(build_configured(config.model), config.model.input_shape)
        self.num_layers = len(self.layers)
        self.sides = {"edge": edge, "cloud": cloud}
        for side, device_profile in self.sides.items():
            device_profile.check_model(config.model.name, config.model.input_shape, self.layers, f"the {side} profile")
        self._prefix: dict[tuple[str, str, int], list[float]] = {}

    def segment(self, side: str, what: str, start: int, stop: int, n: int) -> float:
        """Seconds of ``what`` (forward or backward) of layers [start, stop) on ``side`` for ``n`` samples."""
        key = (side, what, n)
        if key not in self._prefix:
            timing = getattr(self.sides[side], f"{what}_seconds")
            self._prefix[key] = [0.0, *accumulate(timing(index, n) for index in range(self.num_layers))]
        return self._prefix[key][stop] - self._prefix[key][start]

    def shapes(self, head: int, tail: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Per-sample shapes of the uplink (head output) and downlink (middle output) tensors."""
        up = tuple(self.config.model.input_shape) if head == 0 else self.layers[head - 1].output_shape
        return up, self.layers[self.num_layers - tail - 1].output_shape

    def fits_message_bound(self, head: int, tail: int, chunks: int) -> bool:
        """Whether the largest fp32 cut frame fits ``link.max_message_mib``, as wire.message_limit checks."""
        up, down = self.shapes(head, tail)
        train = -(-self.config.train.batch_size // chunks)
        batch = max(train, self.config.train.eval_batch_size or train)
        frame = max(math.prod(up), math.prod(down)) * 4 * batch + 10 * batch + 8 * max(up[0], down[0])
        return frame + _MESSAGE_SLACK <= self.config.link.max_message_mib << 20

    def evaluate(
        self, head: int, tail: int, chunks: int, uplink: str, gradients: str, link: LinkSpec, head_trains: bool
    ) -> Candidate:
        """Simulate the steady-state step of one candidate and count its bytes."""
        sizes = _micro_sizes(self.config.train.batch_size, chunks)
        # torch.chunk makes at most two sizes: work each out once.
        per_size = {n: self._micro(n, head, tail, uplink, gradients, link, head_trains) for n in set(sizes)}
        period, busy = _simulate([per_size[n][0] for n in sizes])
        return Candidate(
            edge_head=head,
            edge_tail=tail,
            chunks=chunks,
            uplink=uplink,
            downlink=self.config.link.downlink,
            gradients=gradients,
            head_trains=head_trains,
            # In nanoseconds: sums in another order differ in the last bit, which must not rank them.
            step_seconds=round(period + link.rtt_ms / 1000, 9),
            # Control frames: begin and end go up, done comes down.
            uplink_bytes=2 * FRAME_OVERHEAD_BYTES + sum(per_size[n][1] for n in sizes),
            downlink_bytes=FRAME_OVERHEAD_BYTES + sum(per_size[n][2] for n in sizes),
            busy_seconds=busy,
            bottleneck=max(RESOURCES, key=lambda r: busy[r]),
        )

    def _micro(
        self, n: int, head: int, tail: int, uplink: str, gradients: str, link: LinkSpec, head_trains: bool
    ) -> tuple[_Chain, int, int]:
        """The task chain of one micro-batch of ``n`` samples, and the bytes it sends up and down."""
        up_shape, down_shape = self.shapes(head, tail)
        stop = self.num_layers - tail
        # edge_tail = 0: the loss is on the cloud, so the labels ride along with the activation.
        labels = 0 if tail else n * _varint_bytes(self.config.model.num_classes - 1)
        up = _frame_bytes(uplink, "activation", (n, *up_shape)) + labels
        chain = [
            ("edge", self.segment("edge", "forward", 0, head, n), False),
            ("uplink", link.seconds("uplink", up), False),
            ("cloud", self.segment("cloud", "forward", head, stop, n), False),
        ]
        down = 0
        if tail:
            activation = _frame_bytes(self.config.link.downlink, "activation", (n, *down_shape))
            gradient = _frame_bytes(gradients, "gradient", (n, *down_shape))
            tail_seconds = sum(self.segment("edge", what, stop, self.num_layers, n) for what in ("forward", "backward"))
            chain += [
                ("downlink", link.seconds("downlink", activation), False),
                ("edge", tail_seconds, True),
                ("uplink", link.seconds("uplink", gradient), True),
            ]
            up, down = up + gradient, activation
        chain.append(("cloud", self.segment("cloud", "backward", head, stop, n), True))
        if head > 0 and head_trains:
            gradient = _frame_bytes(gradients, "gradient", (n, *up_shape))
            chain += [
                ("downlink", link.seconds("downlink", gradient), True),
                ("edge", self.segment("edge", "backward", 0, head, n), True),
            ]
            down += gradient
        return chain, up, down


#: A task: its resource, seconds, priority (step, 0 for backward work / 1 for forward,
#: micro-batch; the lowest ready one runs first) and the tasks it waits for.
_Task = tuple[str, float, tuple[int, int, int], list[int]]


def _tasks(micro: list[_Chain], steps: int) -> list[_Task]:
    """The task graph of ``steps`` back-to-back steps of ``micro`` (see :func:`_simulate`)."""
    tasks: list[_Task] = []
    last_forward: dict[str, int] = {}
    updated: dict[str, list[int]] = {"edge": [], "cloud": []}  # the previous step's backwards of each side
    for step in range(steps):
        done: dict[str, list[int]] = {"edge": [], "cloud": []}
        for index, chain in enumerate(micro):
            after: list[int] = []
            for resource, seconds, backward in chain:
                if resource in done and not backward:
                    # A side computes micro-batches in order, the first only once its optimizer
                    # has stepped, i.e. once its own backwards of the previous step are done.
                    after += [last_forward[resource]] if index else updated[resource]
                tasks.append((resource, seconds, (step, 0 if backward else 1, index), after))
                after = [len(tasks) - 1]
                if resource in done:
                    if backward:
                        done[resource].append(after[0])
                    else:
                        last_forward[resource] = after[0]
        updated = done
    return tasks


def _simulate(micro: list[_Chain]) -> tuple[float, dict[str, float]]:
    """Steady-state step seconds of the 1F1B schedule of ``micro``, and each resource's busy seconds per step.

    Four resources (edge compute, uplink, cloud compute, downlink) each serve one task at a
    time; whenever one is free it starts its ready task of lowest priority (earlier step,
    backward before forward, earlier micro-batch), so a micro-batch's backward starts as soon
    as its output gradient exists. A side starts the next step's forwards once its own
    backwards of the step are done (its optimizer step), without waiting for the other side
    to drain. The step time is the gap between the ends of the last two simulated steps.
    """
    tasks = _tasks(micro, _SIMULATED_STEPS)
    waiting = [len(after) for _, _, _, after in tasks]
    successors: list[list[int]] = [[] for _ in tasks]
    ready: dict[str, list[tuple[tuple[int, int, int], int]]] = {r: [] for r in RESOURCES}
    for index, (resource, _, priority, after) in enumerate(tasks):
        for before in after:
            successors[before].append(index)
        if not after:
            heapq.heappush(ready[resource], (priority, index))
    idle = dict.fromkeys(RESOURCES, True)
    finish = [math.nan] * len(tasks)
    events: list[tuple[float, int]] = []
    now = 0.0
    while True:
        for resource in RESOURCES:
            if idle[resource] and ready[resource]:
                _, index = heapq.heappop(ready[resource])
                finish[index] = now + tasks[index][1]
                idle[resource] = False
                heapq.heappush(events, (finish[index], index))
        if not events:
            break
        now = events[0][0]
        while events and events[0][0] == now:  # free every resource done now before the next pick
            _, index = heapq.heappop(events)
            idle[tasks[index][0]] = True
            for later in successors[index]:
                waiting[later] -= 1
                if not waiting[later]:
                    heapq.heappush(ready[tasks[later][0]], (tasks[later][2], later))
    ends = [0.0] * _SIMULATED_STEPS
    busy = dict.fromkeys(RESOURCES, 0.0)
    for (resource, seconds, (step, _, _), _), end in zip(tasks, finish, strict=True):
        ends[step] = max(ends[step], end)
        if step == 0:
            busy[resource] += seconds
    return ends[-1] - ends[-2], busy


def _micro_sizes(batch: int, chunks: int) -> list[int]:
    """Micro-batch sizes as ``torch.chunk`` cuts a batch (what the edge does): it may make fewer chunks."""
    size = -(-batch // chunks)
    return [size] * (batch // size) + ([batch % size] if batch % size else [])


def _frame_bytes(codec: str, role: Role, shape: tuple[int, ...]) -> int:
    """Bytes of one tensor frame: payload, quantization scales (float32) and framing."""
    scales = 0
    if codec == "fp16":
        scales = 4
    elif codec.startswith("int"):
        per_channel = len(shape) >= 2 and math.prod(shape) // shape[1] >= MIN_CHANNEL_ELEMENTS
        # Activations are affine (a scale and a zero point per group), gradients symmetric.
        scales = (shape[1] if per_channel else 1) * (8 if role == "activation" else 4)
    return payload_bytes(codec, shape) + scales + FRAME_OVERHEAD_BYTES


def _varint_bytes(value: int) -> int:
    return max(1, -(-value.bit_length() // 7))
