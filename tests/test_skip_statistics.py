"""Tests for pipeline.skip.statistics: per-layer weight norms, variances and epoch update norms."""

import math
import statistics

import pytest
import torch
from torch import nn

from pipeline.skip import LayerStatistics


def _stats_layers() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.BatchNorm2d(2),  # no Conv/Linear: no statistics
        nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 2)),
        nn.ReLU(),
        nn.Linear(2, 3),
    )


def test_layer_statistics_match_a_hand_computation():
    layers = _stats_layers()
    collector = LayerStatistics(layers, offset=5)
    got = collector.collect(epoch_end=False)
    assert [(s.index, s.has_conv, s.epoch_update_norm) for s in got] == [(6, True, None), (8, False, None)]
    for stat, weights in zip(got, ([layers[1][0].weight, layers[1][3].weight], [layers[3].weight])):
        values = [v for w in weights for v in w.detach().reshape(-1).tolist()]  # biases and BN excluded
        assert stat.weight_norm == pytest.approx(math.sqrt(sum(v * v for v in values)), rel=1e-6)
        assert stat.weight_variance == pytest.approx(statistics.variance(values), rel=1e-5)


def test_layer_statistics_epoch_update_norm_and_checkpoint():
    layers = _stats_layers()
    collector = LayerStatistics(layers, offset=5)
    with torch.no_grad():
        layers[1][0].weight[0, 0, 0, 0] += 0.5
        layers[3].weight.add_(0.1)
    updates = [s.epoch_update_norm for s in collector.collect(epoch_end=True)]
    assert updates == pytest.approx([0.5, math.sqrt(6 * 0.01)], rel=1e-5)
    # The snapshot was retaken at the epoch end.
    assert [s.epoch_update_norm for s in collector.collect(epoch_end=True)] == [0.0, 0.0]

    with torch.no_grad():
        layers[3].weight.add_(-0.2)
    restored = LayerStatistics(layers, offset=5)  # its own snapshot already holds the new weights
    restored.load_state_dict({k: v.clone() for k, v in collector.state_dict().items()})
    expected = [s.epoch_update_norm for s in collector.collect(epoch_end=True)]
    assert [s.epoch_update_norm for s in restored.collect(epoch_end=True)] == expected
    assert expected == pytest.approx([0.0, math.sqrt(6 * 0.04)], rel=1e-5)
    with pytest.raises(ValueError, match="partition"):
        LayerStatistics(layers, offset=4).load_state_dict(collector.state_dict())


def test_a_snapshot_of_another_shape_is_refused():
    layers = _stats_layers()
    state = LayerStatistics(layers, offset=0).state_dict()
    state["3"] = torch.zeros(5)
    with pytest.raises(ValueError, match=r"layer 3 has shape \(5,\), expected \(6,\)"):
        LayerStatistics(layers, offset=0).load_state_dict(state)


def test_a_single_weight_has_variance_zero():
    (stat,) = LayerStatistics(nn.Sequential(nn.Linear(1, 1)), offset=0).collect(epoch_end=False)
    assert stat.weight_variance == 0.0


def test_a_side_without_weights_reports_nothing():
    collector = LayerStatistics(nn.Sequential(nn.ReLU(), nn.Flatten()), offset=2)
    assert collector.collect(epoch_end=True) == [] and collector.state_dict() == {}
