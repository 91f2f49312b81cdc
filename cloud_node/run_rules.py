"""What the run agreed at Open fixes about every step: its length's bounds, each begin frame, each end's statistics."""
from __future__ import annotations

from dataclasses import dataclass

import grpc

from cloud_node.refusal import Refusal
from pipeline import wire
from pipeline.config import TrainSection
from pipeline.optim import learning_rate
from pipeline.skip import LayerStat
from protos import edgepipe_pb2 as pb

__all__ = ["RunRules", "check_run_length"]

#: Step and epoch numbers travel as int64 and int32.
_MAX_STEPS = 2**31 - 1


def check_run_length(total_steps: int, steps_per_epoch: int) -> None:
    """Refuse a handshake whose run length is missing or impossible (INVALID_ARGUMENT).

    Nothing more can be checked against ``[train] epochs`` and ``max_steps``: the edge's
    ``--epochs`` and ``--max-steps`` override them, and only the edge knows its dataset's size.
    """
    for name, value in (("total_steps", total_steps), ("steps_per_epoch", steps_per_epoch)):
        if not 1 <= value <= _MAX_STEPS:
            raise Refusal(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"OpenRequest.{name} is {value}; it must lie in 1..{_MAX_STEPS} (is the edge older than this cloud?)",
            )


@dataclass(frozen=True)
class RunRules:
    """A run's length and split: every step's learning rate, epoch and epoch end follow from them.

    Each value an edge sends that differs is a broken or hostile edge (an lr of inf or NaN would
    poison every weight): :class:`pipeline.wire.WireError`, naming the field.
    """

    train: TrainSection
    total_steps: int
    steps_per_epoch: int
    chunks: int
    num_layers: int
    edge_layers: frozenset[int]
    #: The shape of each parameter tensor of each edge layer, in ``layer.parameters()`` order.
    edge_shapes: dict[int, tuple[tuple[int, ...], ...]]

    def check_begin(self, step: int, begin: pb.StepBegin) -> None:
        """Check a begin frame's values against what step ``step`` of this run has."""
        if step >= self.total_steps:
            raise wire.WireError(f"step {step} is past the run's {self.total_steps} steps")
        expected = {
            "lr": learning_rate(self.train, step, self.total_steps),
            "samples": self.train.batch_size,
            "epoch": step // self.steps_per_epoch,
            "chunks": self.chunks,
        }
        for field, value in expected.items():
            got = getattr(begin, field)
            if got != value:
                raise wire.WireError(f"begin.{field} is {got!r}; step {step} of this run has {field} {value!r}")

    def edge_stats(self, step: int, end: pb.StepEnd) -> list[LayerStat]:
        """The edge's layer statistics of an end frame, checked: its layers only, update norms exactly at epoch ends."""
        epoch_end = (step + 1) % self.steps_per_epoch == 0 or step == self.total_steps - 1
        if end.epoch_end != epoch_end:
            raise wire.WireError(f"end.epoch_end is {end.epoch_end}; step {step} of this run has {epoch_end}")
        stats = wire.stats_from_message(end.stats, num_layers=self.num_layers)
        indices = [s.index for s in stats]
        if not set(indices) <= self.edge_layers or len(set(indices)) != len(indices):
            raise wire.WireError("end.stats must name each of the edge's layers at most once, and no cloud layer")
        if any((s.epoch_update_norm is not None) != epoch_end for s in stats):
            raise wire.WireError("end.stats carry an epoch update norm exactly on an epoch's last step")
        for s in stats:
            # The policy reads tensors by position: a layer's must be exactly the model's.
            if tuple(p.shape for p in s.params) != self.edge_shapes.get(s.index, ()):
                raise wire.WireError(f"end.stats of layer {s.index} must describe each of its parameter tensors, in order")
        return stats
