"""Tests for pipeline.skip.statistics: per-tensor norms, variances and epoch update norms, and the layer aggregates."""

import math
import statistics

import pytest
import torch
from torch import nn

from pipeline.skip import LayerStat, LayerStatistics, ParamStat, StepStats


def _stats_layers() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.BatchNorm2d(2),  # tensors, but no weights of two or more dimensions
        nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 2)),
        nn.ReLU(),
        nn.Linear(2, 3),
    )


def test_every_tensor_has_its_own_statistics():
    layers = _stats_layers()
    got = LayerStatistics(layers, offset=5).collect(epoch_end=False)
    assert [s.index for s in got] == [5, 6, 8]
    for stat, layer in zip(got, (layers[0], layers[1], layers[3])):
        tensors = list(layer.parameters())
        assert [p.shape for p in stat.params] == [tuple(t.shape) for t in tensors]
        for p, t in zip(stat.params, tensors):
            values = t.detach().reshape(-1).tolist()
            assert p.norm == pytest.approx(math.sqrt(sum(v * v for v in values)), rel=1e-6)
            assert p.variance == pytest.approx(statistics.variance(values), rel=1e-5, abs=1e-12)
            assert p.update_norm is None
            assert p.norm == float(torch.tensor(p.norm, dtype=torch.float32)), "float32 values"


def test_layer_aggregates_are_over_the_weights_of_two_or_more_dimensions():
    layers = _stats_layers()
    got = LayerStatistics(layers, offset=5).collect(epoch_end=False)
    assert [(s.index, s.has_conv, s.epoch_update_norm) for s in got] == [(5, False, None), (6, True, None),
                                                                        (8, False, None)]
    assert got[0].weight_norm == 0.0
    for stat, weights in zip(got[1:], ([layers[1][0].weight, layers[1][3].weight], [layers[3].weight])):
        values = [v for w in weights for v in w.detach().reshape(-1).tolist()]  # biases and BN excluded
        assert stat.weight_norm == pytest.approx(math.sqrt(sum(v * v for v in values)), rel=1e-6)
    assert LayerStat.of(3, got[1].params) == LayerStat(3, True, got[1].weight_norm, None, got[1].params)


def test_epoch_update_norms_and_checkpoint():
    layers = _stats_layers()
    collector = LayerStatistics(layers, offset=5)
    with torch.no_grad():
        layers[1][0].weight[0, 0, 0, 0] += 0.5
        layers[1][0].bias.add_(1.0)
        layers[3].weight.add_(0.1)
    got = collector.collect(epoch_end=True)
    assert [p.update_norm for p in got[1].params] == pytest.approx([0.5, math.sqrt(2), 0, 0, 0, 0], abs=1e-6)
    # The layer's update norm is its weights', not its bias'.
    assert [s.epoch_update_norm for s in got] == pytest.approx([0.0, 0.5, math.sqrt(6 * 0.01)], rel=1e-5)
    # The snapshot was retaken at the epoch end.
    assert [s.epoch_update_norm for s in collector.collect(epoch_end=True)] == [0.0, 0.0, 0.0]

    with torch.no_grad():
        layers[3].weight.add_(-0.2)
    restored = LayerStatistics(layers, offset=5)  # its own snapshot already holds the new weights
    restored.load_state_dict({k: v.clone() for k, v in collector.state_dict().items()})
    expected = [s.epoch_update_norm for s in collector.collect(epoch_end=True)]
    assert [s.epoch_update_norm for s in restored.collect(epoch_end=True)] == expected
    assert expected == pytest.approx([0.0, 0.0, math.sqrt(6 * 0.04)], rel=1e-5)
    with pytest.raises(ValueError, match="partition"):
        LayerStatistics(layers, offset=4).load_state_dict(collector.state_dict())


def test_a_snapshot_of_another_shape_is_refused():
    layers = _stats_layers()
    state = LayerStatistics(layers, offset=0).state_dict()
    state["3"] = torch.zeros(5)
    with pytest.raises(ValueError, match=r"layer 3 has shape \(5,\), expected \(9,\)"):
        LayerStatistics(layers, offset=0).load_state_dict(state)


def test_a_single_element_has_variance_zero():
    (stat,) = LayerStatistics(nn.Sequential(nn.Linear(1, 1)), offset=0).collect(epoch_end=False)
    assert [p.variance for p in stat.params] == [0.0, 0.0]


def test_a_side_without_parameters_reports_nothing():
    collector = LayerStatistics(nn.Sequential(nn.ReLU(), nn.Flatten()), offset=2)
    assert collector.collect(epoch_end=True) == [] and collector.state_dict() == {}


def test_step_stats_number_tensors_as_model_parameters_does():
    tensor = ParamStat((2,), 1.0, 0.5, None)
    stats = StepStats(0, 0, False, 0.1, (LayerStat.of(1, [tensor]), LayerStat.of(3, [tensor, tensor])))
    assert [index for index, _ in stats.parameters([0, 1, 3, 3])] == [1, 2, 3]
    with pytest.raises(ValueError, match="layer 3 name 2 parameter tensors; it has 1"):
        list(stats.parameters([0, 1, 3]))
