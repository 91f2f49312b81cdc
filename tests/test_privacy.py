"""Only the declared cut tensors cross the link: labels and raw inputs stay on the edge."""
from __future__ import annotations

from edge_node.worker import train
from pipeline.models import build_model
from pipeline.partition import cut_shapes, make_cuts
from tests.conftest import make_config


def test_no_frame_carries_labels_or_inputs_when_the_edge_holds_the_tail(tmp_path, recording_cloud):
    config = make_config(partition={"edge_head": 1, "edge_tail": 1, "chunks": 4})
    address, servicer = recording_cloud(config)
    train(config, run_dir=tmp_path / "run", cloud=address, max_steps=4)

    model = build_model("tinycnn", num_classes=10, input_shape=(1, 8, 8), seed=0)
    uplink, downlink = cut_shapes(model, (1, 8, 8), make_cuts(len(model), 1, 1))
    assert uplink != (1, 8, 8), "the cut must differ from the raw input for this test to mean anything"
    tensors = 0
    for frame in servicer.received:
        assert not frame.labels, f"step {frame.step} frame carries labels"
        body = frame.WhichOneof("body")
        if body == "activation":
            assert tuple(frame.activation.shape[1:]) == uplink
            tensors += 1
        elif body == "gradient":
            assert tuple(frame.gradient.shape[1:]) == downlink
            tensors += 1
        else:
            assert body in ("begin", "end"), body
    assert tensors == 4 * 4 * 2, "every micro-batch sends one activation and one gradient"


def test_labels_cross_only_when_the_loss_is_on_the_cloud(tmp_path, recording_cloud):
    config = make_config(partition={"edge_head": 1, "edge_tail": 0, "chunks": 4})
    address, servicer = recording_cloud(config)
    train(config, run_dir=tmp_path / "run", cloud=address, max_steps=2)
    activations = [f for f in servicer.received if f.WhichOneof("body") == "activation"]
    assert activations and all(len(f.labels) == f.activation.shape[0] for f in activations)
