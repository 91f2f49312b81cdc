"""Tests for the skip messages of pipeline.wire: decisions with frozen tensors and rate bases, per-tensor statistics."""

import pytest

from pipeline import wire
from pipeline.skip import Decision, LayerStat, ParamStat
from protos import edgepipe_pb2 as pb


def _roundtrip_decision(decision: Decision) -> Decision:
    message = pb.Decision.FromString(wire.decision_to_message(decision).SerializeToString())
    return wire.decision_from_message(message)


def test_a_decision_crosses_the_wire_with_its_frozen_tensors_factors_and_bases():
    decision = Decision(1, {4: 0.25, 5: 0.25, 6: 0.5}, 5, {4: 0.03, 5: 0.03})
    assert _roundtrip_decision(decision) == decision
    # A decision restored from a layer-level checkpoint names no tensor prefix, and says so.
    assert _roundtrip_decision(Decision(2)) == Decision(2)
    assert _roundtrip_decision(Decision(0, {}, 0)).frozen_parameters == 0


def test_statistics_cross_the_wire_tensor_by_tensor():
    tensors = [ParamStat((4, 2, 3, 3), 2.5, 0.125, 0.5), ParamStat((4,), 0.5, 0.0, 0.25)]
    stats = [LayerStat.of(3, tensors), LayerStat.of(5, [ParamStat((2, 4), 1.0, 0.5, 0.0)])]
    messages = [pb.LayerStat.FromString(m.SerializeToString()) for m in wire.stats_to_message(stats)]
    assert wire.stats_from_message(messages, num_layers=6) == stats


@pytest.mark.parametrize(
    ("param", "update", "message"),
    [
        (pb.LayerStat.Param(shape=[2], norm=float("nan"), variance=0.0), None, "finite and non-negative"),
        (pb.LayerStat.Param(shape=[2], norm=1.0, variance=-1.0), None, "finite and non-negative"),
        (pb.LayerStat.Param(shape=[2], norm=1.0, variance=0.0, update_norm=1.0), None, "update norm"),
        (pb.LayerStat.Param(shape=[2], norm=1.0, variance=0.0), 1.0, "update norm"),
        (pb.LayerStat.Param(shape=[-2], norm=1.0, variance=0.0), None, "negative sizes"),
    ],
)
def test_bad_tensor_statistics_are_refused(param, update, message):
    layer = pb.LayerStat(index=0, weight_norm=1.0, epoch_update_norm=update, params=[param])
    with pytest.raises(wire.WireError, match=message):
        wire.stats_from_message([layer], num_layers=2)
