"""The edge in a split-federated run: its sync at each round's end, and the one-process reference of a federation."""
from __future__ import annotations

import copy
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import torch
from torch import nn

from edge_node.engines import NextStep, SplitEngine, StepResult, batch_loss, micro_batches
from edge_node.link import CloudLink, LinkError, link_error
from edge_node.recovery import traffic_sum
from pipeline import wire
from pipeline.blueprint import Blueprint
from pipeline.checkpoint import save_json, save_state
from pipeline.config import Config, ConfigError
from pipeline.data import DataError, Dataset, Shard, load_dataset, mini_batches, shard, training_batches
from pipeline.federation import (
    FEDERATION_FILE, Admission, Contribution, FederationError, FederationRecord, GroupPolicy, check_federation,
    edge_layers, exchanged_keys, fedavg, federated, load_record, round_ends,
)
from pipeline.optim import learning_rate
from pipeline.partition import split
from pipeline.skip import Decision
from pipeline.traffic import SYNC, TrafficMeter
from pipeline.trainer import StageTrainer
from protos import edgepipe_pb2 as pb

__all__ = ["FederatedEngine", "FederatedLink", "simulate"]

_SYNC_METHOD = "/edgepipe.v1.Cloud/Sync"


class FederatedLink(CloudLink):
    """The link of a federated edge: the calls of :class:`CloudLink`, and Sync, counted as kind and phase ``sync``."""

    def sync(
        self, frames: Iterable[pb.SyncFrame], *, timeout: float, traffic: TrafficMeter
    ) -> Iterator[pb.SyncFrame]:
        """Send this edge's part of a round and stream back the group's average; ``traffic`` counts this call too."""
        meters = (self.meter, traffic)

        def serialize(message: pb.SyncFrame) -> bytes:
            data = message.SerializeToString()
            for meter in meters:
                meter.count("uplink", SYNC, len(data), SYNC)
            return data

        def deserialize(data: bytes) -> pb.SyncFrame:
            for meter in meters:
                meter.count("downlink", SYNC, len(data), SYNC)
            return pb.SyncFrame.FromString(data)

        call = self._channel.stream_stream(_SYNC_METHOD, request_serializer=serialize, response_deserializer=deserialize)
        try:
            yield from call(iter(frames), timeout=timeout)
        except grpc.RpcError as exc:
            raise link_error(self.address, exc) from None


class FederatedEngine(SplitEngine):
    """A split engine in a federation: after each round's last step it sends its head and tail to
    the cloud, takes the group's average and the group's decision, and notes the round in
    ``record_path`` (``federation.json``)."""

    def __init__(
        self, blueprint: Blueprint, link: FederatedLink, edge_name: str, *, total_steps: int, steps_per_epoch: int,
        samples: int, record_path: Path,
    ) -> None:
        super().__init__(blueprint, link, edge_name, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
        self.link: FederatedLink = link
        self.samples = samples
        self.record_path = record_path
        self.federation = self.config.federation
        self._layers = edge_layers(self.config, len(self.model))
        self._record = FederationRecord(mode=self.federation.mode, sync_every=self.federation.sync_every, members=[])

    def step(
        self, step: int, epoch: int, lr: float, x: torch.Tensor, y: torch.Tensor, epoch_end: bool,
        checkpoint: bool = False, following: NextStep | None = None, indices: torch.Tensor | None = None,
    ) -> StepResult:
        """One split step; at a round's end, the sync. Federated runs keep no checkpoints.

        The next step may begin early inside a round only: after a round's last step the weights
        change, so the next step waits for the average.
        """
        last = round_ends(step, sync_every=self.federation.sync_every, steps_per_epoch=self.steps_per_epoch,
                          total_steps=self.total_steps)
        result = super().step(step, epoch, lr, x, y, epoch_end, False, None if last else following, indices)
        if not last:
            return result
        traffic = TrafficMeter()
        decision = self._sync(step, traffic)
        counts = traffic.snapshot() if result.traffic is None else traffic_sum(result.traffic, traffic.snapshot())
        return replace(result, decision=decision, traffic=counts)

    def _sync(self, step: int, traffic: TrafficMeter) -> Decision:
        own = self.model.state_dict()
        keys = exchanged_keys(self.model, self._layers, self.decision)
        session = self.link.session

        def frames() -> Iterator[pb.SyncFrame]:
            yield pb.SyncFrame(session=session, step=step, begin=pb.SyncBegin(samples=self.samples))
            for key in keys:
                yield pb.SyncFrame(session=session, step=step,
                                   tensor=pb.NamedTensor(name=key, tensor=wire.raw_to_message(own[key])))

        timeout = self.federation.round_timeout_seconds + self.config.link.timeout_seconds
        received: dict[str, torch.Tensor] = {}
        done = None
        for frame in self.link.sync(frames(), timeout=timeout, traffic=traffic):
            body = frame.WhichOneof("body")
            if done is not None or frame.step != step or body not in ("tensor", "done"):
                raise LinkError(f"unexpected {body!r} frame from the cloud in the sync of step {step}")
            if body == "done":
                done = frame.done
                continue
            name = frame.tensor.name
            if name not in keys or name in received:
                raise LinkError(f"the cloud sent an unexpected average {name[:40]!r}")
            try:
                tensor = wire.raw_from_message(frame.tensor.tensor, like=own[name], what=f"average {name}")
            except wire.WireError as exc:
                raise LinkError(f"bad average from the cloud: {exc}") from None
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise LinkError(f"the cloud's average {name} holds NaN or infinite values")
            received[name] = tensor
        if done is None or len(received) != len(keys):
            raise LinkError(f"the cloud ended the sync of step {step} without every average and its done frame")
        decision = wire.decision_from_message(done.decision)
        if not 0 <= decision.boundary < len(self.model):
            raise LinkError(f"the cloud decided boundary {decision.boundary} for a {len(self.model)}-layer model")
        with torch.no_grad():
            for name, tensor in received.items():
                own[name].copy_(tensor)
        self.apply(decision)
        admissions = [*self._record.admissions, *(Admission(edge=a.edge, step=a.step) for a in done.admissions)]
        self._record = self._record.model_copy(update={"members": list(done.members), "admissions": admissions})
        save_json(self._record.model_dump(), self.record_path)
        return decision


# -- the one-process reference ---------------------------------------------------------


class _ReferenceEdge:
    """One edge of the reference: its head and tail, and a middle of its own (v1) or the shared one (v2).

    A step runs the operations of a split step in the same order on the same stages, so its
    result equals the split run's bit for bit.
    """

    def __init__(self, name: str, data: Dataset, model: nn.Sequential, middle: StageTrainer, blueprint: Blueprint) -> None:
        self.name, self.data = name, data
        self.config = blueprint.config
        cuts = blueprint.cuts
        head, _, tail = split(model, cuts)
        self.head = StageTrainer(head, 0, self.config.train, blueprint.param_layers)
        self.tail = StageTrainer(tail, cuts.middle_stop, self.config.train, blueprint.param_layers)
        self.middle = middle
        self.cuts = cuts
        # The whole model this edge ends with: its head and tail around the middle it trains.
        items = list(model._modules.items())
        middle_items = list(middle.stage.layers._modules.items())
        self.model = nn.Sequential(OrderedDict(items[: cuts.middle_start] + middle_items + items[cuts.middle_stop :]))

    def trainers(self) -> list[StageTrainer]:
        return [self.head, self.middle, self.tail]

    def step(self, lr: float, x: torch.Tensor, y: torch.Tensor, boundary: int, epoch_end: bool) -> None:
        head, middle, tail = self.head.stage, self.middle.stage, self.tail.stage
        head_trains = boundary < self.cuts.edge_head
        middle_trains = boundary < self.cuts.middle_stop
        loss_on_cloud = self.cuts.edge_tail == 0
        for trainer in self.trainers():
            trainer.begin(lr)
        micro = micro_batches(x, y, self.config.partition.chunks)
        samples = len(y)
        for index, (xi, yi) in enumerate(micro):
            a = head.forward(index, xi)
            z = middle.forward(index, a, input_grad=head_trains)
            if loss_on_cloud:
                grad = middle.backward(index, loss=batch_loss(z, yi, samples)) if middle.trains else None
            else:
                out = tail.forward(index, z, input_grad=middle_trains)
                grad_z = tail.backward(index, loss=batch_loss(out, yi, samples))
                grad = middle.backward(index, grad_z) if middle_trains else None
            if head_trains:
                head.backward(index, grad)
        for trainer in (self.head, self.tail, self.middle):
            trainer.commit(epoch_end=epoch_end)

    def apply(self, decision: Decision) -> None:
        for trainer in self.trainers():
            trainer.apply(decision)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail.stage.evaluate(self.middle.stage.evaluate(self.head.stage.evaluate(x)))


def _shards(config: Config, count: int) -> tuple[list[Dataset], Dataset]:
    model = config.model
    train, val = load_dataset(config.train.dataset, input_shape=model.input_shape, num_classes=model.num_classes,
                              val_fraction=config.train.val_fraction, seed=model.seed)
    return [shard(train, Shard(k, count), seed=model.seed) for k in range(1, count + 1)], val


def _order(record: FederationRecord | None, names: list[str], total_steps: int) -> list[Admission]:
    """Every edge's steps in the order they are replayed: the record's (splitfed-v2), else step by step in name order."""
    if record is None:
        return [Admission(edge=name, step=step) for step in range(total_steps) for name in sorted(names)]
    if sorted(record.members) != sorted(names):
        raise FederationError(
            f"the federation file's edges are {', '.join(sorted(record.members))}; this reference names its "
            f"edges {', '.join(sorted(names))} (--name PREFIX gives PREFIX-1 .. PREFIX-N, on shards 1/N .. N/N)"
        )
    next_step = dict.fromkeys(names, 0)
    for entry in record.admissions:
        if entry.edge not in next_step or entry.step != next_step[entry.edge]:
            raise FederationError(f"the admission order has edge {entry.edge}'s step {entry.step} out of turn")
        next_step[entry.edge] += 1
    if any(n != total_steps for n in next_step.values()):
        raise FederationError(f"the admission order does not hold {total_steps} steps of every edge")
    return list(record.admissions)


def simulate(
    config: Config, *, edges: int, run_dir: str | Path, name: str = "edge", epochs: int | None = None,
    max_steps: int | None = None, replay: str | Path | None = None,
) -> dict[str, Any]:
    """Train a whole federation of ``edges`` edges in this process: the reference a split-federated run must equal.

    Edge ``{name}-K`` trains shard K/``edges`` of ``[train] dataset``, as ``edgepipe-edge --name
    {name}-K --shard K/N`` does. Rounds, averaging and the group's skip decisions are those of
    the cloud; splitfed-v2 replays the admission order of ``replay`` (a ``federation.json`` of
    one of the run's edges), or without it runs each step's edges in name order. Exact with
    fp32 codecs. Writes ``model.pt`` (every edge's averaged model), ``summary.json`` and
    ``federation.json`` into ``run_dir``; returns the summary.
    """
    if not federated(config):
        raise ConfigError('federation.mode is "none": a reference of many edges needs a split-federated mode')
    if edges != config.federation.edges:
        raise ConfigError(f"--edges {edges} but federation.edges = {config.federation.edges}: the cloud waits for those")
    check_federation(config)
    start = time.perf_counter()
    blueprint = Blueprint(config)
    shards, val = _shards(config, edges)
    batch = config.train.batch_size
    steps_per_epoch = len(shards[0]) // batch
    if steps_per_epoch == 0:
        raise DataError(f"each shard has {len(shards[0])} samples, fewer than train.batch_size = {batch}")
    epochs = epochs or config.train.epochs
    limit = max_steps or config.train.max_steps
    total_steps = epochs * steps_per_epoch if limit is None else min(limit, epochs * steps_per_epoch)
    names = [f"{name}-{k}" for k in range(1, edges + 1)]
    record = None if replay is None else load_record(replay)
    mode = config.federation.mode
    if record is not None and (record.mode != mode or record.sync_every != config.federation.sync_every):
        raise FederationError(f"{replay} records a {record.mode} run syncing every {record.sync_every} steps, "
                              f"not this configuration's {mode} every {config.federation.sync_every}")
    order = _order(record if mode == "splitfed-v2" else None, names, total_steps)

    cuts = blueprint.cuts
    shared = None
    if mode == "splitfed-v2":
        _, middle, _ = split(copy.deepcopy(blueprint.model), cuts)
        shared = StageTrainer(middle, cuts.middle_start, config.train, blueprint.param_layers)
    group: list[_ReferenceEdge] = []
    for edge_name, data in zip(names, shards):
        model = copy.deepcopy(blueprint.model)
        middle = shared or StageTrainer(split(model, cuts)[1], cuts.middle_start, config.train, blueprint.param_layers)
        group.append(_ReferenceEdge(edge_name, data, model, middle, blueprint))
    by_name = {edge.name: edge for edge in group}
    policy = GroupPolicy(blueprint, total_steps=total_steps)
    decision = policy.decision
    for edge in group:
        edge.apply(decision)

    batches = {edge.name: iter(()) for edge in group}
    done_at: dict[int, int] = {}
    for entry in order:
        edge, step = by_name[entry.edge], entry.step
        epoch = step // steps_per_epoch
        if step % steps_per_epoch == 0:
            batches[edge.name] = training_batches(edge.data, batch, seed=config.model.seed, epoch=epoch)
        x, y = next(batches[edge.name])
        epoch_end = (step + 1) % steps_per_epoch == 0 or step == total_steps - 1
        edge.step(learning_rate(config.train, step, total_steps), x, y, decision.boundary, epoch_end)
        if not round_ends(step, sync_every=config.federation.sync_every, steps_per_epoch=steps_per_epoch,
                          total_steps=total_steps):
            continue
        done_at[step] = done_at.get(step, 0) + 1
        if done_at[step] == edges:
            decision = _average(group, blueprint, decision, shared is not None, policy, step, epoch, epoch_end)

    final = group[0]
    correct = 0
    for xb, yb in mini_batches(val, config.train.eval_batch_size or config.micro_batch_size, shuffle_seed=None,
                               drop_last=False):
        correct += int((final.logits(xb).argmax(dim=1) == yb).sum())
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_state(final.model.state_dict(), run_dir / "model.pt")
    played = FederationRecord(mode=mode, sync_every=config.federation.sync_every, members=names,
                              admissions=order if mode == "splitfed-v2" else [])
    save_json(played.model_dump(), run_dir / FEDERATION_FILE)
    summary = {"mode": "reference", "status": "completed", "edges": edges, "steps": total_steps, "epochs": epochs,
               "samples_per_edge": len(shards[0]), "wall_seconds": time.perf_counter() - start,
               "final_val_accuracy": correct / len(val), "config": config.to_dict()}
    save_json(summary, run_dir / "summary.json")
    return summary


def _average(
    group: list[_ReferenceEdge], blueprint: Blueprint, decision: Decision, shared: bool, policy: GroupPolicy,
    step: int, epoch: int, epoch_end: bool,
) -> Decision:
    """A round's end in the reference: the cloud's averages and the group's decision, applied to every edge."""
    config = blueprint.config
    layers = edge_layers(config, blueprint.num_layers)
    if not shared:
        layers = [*layers, *range(blueprint.cuts.middle_start, blueprint.cuts.middle_stop)]
    keys = exchanged_keys(blueprint.model, layers, decision)
    states = {edge.name: edge.model.state_dict() for edge in group}
    averaged = fedavg([Contribution(edge.name, len(edge.data), {k: states[edge.name][k] for k in keys})
                       for edge in group])
    with torch.no_grad():
        for state in states.values():
            for key in keys:
                state[key].copy_(averaged[key])
    decision = policy.round_end(step, epoch, epoch_end, states[group[0].name])
    for edge in group:
        edge.apply(decision)
    return decision
