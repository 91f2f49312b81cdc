"""The link-aware planner: device profiles, the simulated pipeline schedule, enumeration and the CLI."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch

from edgepipe.plan_command import add_partition_commands
from pipeline.codecs import encode, payload_bytes
from pipeline.config import Config, ConfigError, load_config
from pipeline.models import build_configured
from pipeline.partition import profile
from pipeline.planner import (
    FRAME_OVERHEAD_BYTES,
    GRADIENT_CODECS,
    UPLINK_CODECS,
    LinkSpec,
    PlanError,
    plan,
    predict,
)
from pipeline.profiler import DeviceProfile, LayerTiming, ProfileError, measured_sizes, profile_layers
from pipeline.wire import message_limit
from tests.conftest import SMALL_TOML, make_config

# tinycnn on [1, 8, 8]: block1 -> [8, 8, 8], block2 -> [16, 4, 4], pool -> [256], fc -> [10].
HEAD_OUT = (8, 8, 8)
MIDDLE_OUT = (256,)
CONTROL_UP, CONTROL_DOWN = 2 * FRAME_OVERHEAD_BYTES, FRAME_OVERHEAD_BYTES


def _profile(config: Config, forward: list[float], backward: list[float], **fields: object) -> DeviceProfile:
    """A profile of ``config``'s model whose layer i takes exactly forward[i] / backward[i] seconds a sample."""
    layers = profile(build_configured(config.model), config.model.input_shape)
    data = {
        "model_name": config.model.name,
        "input_shape": list(config.model.input_shape),
        "num_layers": len(layers),
        "device": "test",
        "torch_threads": 1,
        "torch_version": torch.__version__,
        "repeats": 1,
        # One measured size: time is proportional to the micro-batch size.
        "batch_sizes": [1],
        "layers": [
            LayerTiming(
                index=p.index,
                name=p.name,
                params=p.params,
                output_shape=list(p.output_shape),
                output_bytes=p.output_bytes,
                forward_seconds=[f],
                backward_seconds=[b],
            )
            for p, f, b in zip(layers, forward, backward, strict=True)
        ],
    }
    data.update(fields)
    return DeviceProfile(**data)


def _fp32(shape: tuple[int, ...]) -> int:
    return payload_bytes("fp32", shape) + FRAME_OVERHEAD_BYTES


# -- the simulated schedule against hand-computed steps ------------------------------------------


def test_one_micro_batch_runs_every_task_in_sequence() -> None:
    config = make_config(partition={"edge_head": 1, "edge_tail": 1, "chunks": 1}, train={"batch_size": 4})
    ef, eb = [1e-3, 2e-3, 3e-3, 4e-3], [5e-3, 6e-3, 7e-3, 8e-3]
    cf, cb = [1e-4, 2e-4, 3e-4, 4e-4], [5e-4, 6e-4, 7e-4, 8e-4]
    link = LinkSpec(up_mbps=1.0, down_mbps=2.0, rtt_ms=10.0)
    got = predict(config, _profile(config, ef, eb), _profile(config, cf, cb), link)

    up_act, down_grad = _fp32((4, *HEAD_OUT)), _fp32((4, *HEAD_OUT))
    down_act, up_grad = _fp32((4, *MIDDLE_OUT)), _fp32((4, *MIDDLE_OUT))
    edge = 4 * (ef[0] + ef[3] + eb[3] + eb[0])
    cloud = 4 * (cf[1] + cf[2] + cb[1] + cb[2])
    uplink = (up_act + up_grad) * 8 / 1e6
    downlink = (down_act + down_grad) * 8 / 2e6
    # One micro-batch: nothing overlaps, and the next step waits for this one's edge backward.
    assert got.step_seconds == pytest.approx(edge + cloud + uplink + downlink + 0.010, rel=1e-9)
    assert got.busy_seconds == pytest.approx({"edge": edge, "uplink": uplink, "cloud": cloud, "downlink": downlink})
    assert got.uplink_bytes == up_act + up_grad + CONTROL_UP
    assert got.downlink_bytes == down_act + down_grad + CONTROL_DOWN
    assert got.bottleneck == "uplink"


def test_a_slow_uplink_makes_the_step_its_bytes_over_the_rate() -> None:
    config = make_config(partition={"chunks": 8})
    tiny = [1e-7] * 4
    link = LinkSpec(up_mbps=0.5, down_mbps=1000.0, rtt_ms=5.0)
    got = predict(config, _profile(config, tiny, tiny), _profile(config, tiny, tiny), link)
    transfer = (got.uplink_bytes - CONTROL_UP) * 8 / 0.5e6
    assert got.bottleneck == "uplink"
    assert got.busy_seconds["uplink"] == pytest.approx(transfer)
    # The uplink never idles but for one micro-batch's turnaround through compute and downlink.
    assert transfer <= got.step_seconds - 0.005 <= transfer * 1.01


def test_a_slow_cloud_makes_the_step_its_compute() -> None:
    config = make_config(partition={"chunks": 4})
    edge = _profile(config, [1e-6] * 4, [1e-6] * 4)
    cloud = _profile(config, [1e-3] * 4, [2e-3] * 4)
    got = predict(config, edge, cloud, LinkSpec(up_mbps=1e4, down_mbps=1e4, rtt_ms=0.0))
    compute = 32 * (1e-3 + 1e-3 + 2e-3 + 2e-3)  # 32 samples through cloud layers 1 and 2, both ways
    assert got.bottleneck == "cloud"
    assert got.busy_seconds["cloud"] == pytest.approx(compute)
    assert compute <= got.step_seconds <= compute * 1.01


def test_three_micro_batches_follow_the_1f1b_schedule_worked_out_by_hand() -> None:
    # Micro-batches of 16, in units of d: edge forward 1, tail 1, head backward 1; cloud forward 4,
    # backward 1; the activation up and the head gradient down 0.5, the two 256-wide tensors 0.25.
    d, n = 1e-3, 16
    config = make_config(partition={"edge_head": 1, "edge_tail": 1, "chunks": 3}, train={"batch_size": 48})
    edge = _profile(config, [d / n, 0.0, 0.0, d / (2 * n)], [d / n, 0.0, 0.0, d / (2 * n)])
    cloud = _profile(config, [0.0, 2 * d / n, 2 * d / n, 0.0], [0.0, d / (2 * n), d / (2 * n), 0.0])
    rate = _fp32((n, *HEAD_OUT)) * 8 / (0.5 * d) / 1e6
    got = predict(config, edge, cloud, LinkSpec(up_mbps=rate, down_mbps=rate, rtt_ms=0.0))
    # edge F0 0-1, F1 1-2, F2 2-3; cloud F0 1.5-5.5, F1 5.5-9.5; edge T0 5.75-6.75; at 9.5 the cloud
    # has F2 and B0 ready and runs B0 first (9.5-10.5), then F2 10.5-14.5; edge T1 9.75-10.75,
    # B0 11-12; cloud B1 14.5-15.5; edge T2 14.75-15.75, B1 16-17; cloud B2 16-17; edge B2 17.5-18.5.
    # (Forwards first would end at 18.) The head trains, so the next step starts after edge B2.
    assert got.step_seconds == pytest.approx(18.5 * d, abs=0.01 * d)
    assert got.bottleneck == "cloud" and got.busy_seconds["cloud"] == pytest.approx(15 * d)


def test_the_next_step_does_not_wait_for_the_cloud_to_drain() -> None:
    # One micro-batch of 4: edge head forward d, head backward d, cloud forward 2d and backward 2d.
    d = 1e-3
    config = make_config(partition={"edge_head": 1, "edge_tail": 1, "chunks": 1}, train={"batch_size": 4})
    edge = _profile(config, [d / 4, 0.0, 0.0, 0.0], [d / 4, 0.0, 0.0, 0.0])
    cloud = _profile(config, [0.0, d / 4, d / 4, 0.0], [0.0, d / 4, d / 4, 0.0])
    fast = LinkSpec(up_mbps=1e9, down_mbps=1e9, rtt_ms=0.0)
    # Training the head, the edge's next forward needs its own backward, which needs the cloud's.
    assert predict(config, edge, cloud, fast).step_seconds == pytest.approx(6 * d, rel=1e-6)
    # Frozen, the edge runs the next head forward while the cloud runs this step's backward.
    assert predict(config, edge, cloud, fast, head_trains=False).step_seconds == pytest.approx(4 * d, rel=1e-6)


def test_more_micro_batches_overlap_a_balanced_pipeline_better() -> None:
    link = LinkSpec(up_mbps=50.0, down_mbps=50.0, rtt_ms=0.0)
    # Both links carry 3072 fp32 bytes a sample each way; four layer times of t make each side as busy.
    t = 3072 * 8 / 50e6 / 4
    steps = []
    for chunks in (1, 2, 4, 8):
        config = make_config(partition={"chunks": chunks})
        got = predict(config, _profile(config, [t] * 4, [t] * 4), _profile(config, [t] * 4, [t] * 4), link)
        steps.append(got.step_seconds)
        if chunks == 1:  # nothing overlaps: the resources take their turns
            assert got.step_seconds == pytest.approx(sum(got.busy_seconds.values()))
        assert max(got.busy_seconds.values()) == pytest.approx(32 * 4 * t, rel=0.02)
    assert steps == sorted(steps, reverse=True) and len(set(steps)) == 4
    assert steps[-1] < 0.4 * steps[0]


def test_a_frozen_head_sends_no_head_gradient_down() -> None:
    config = make_config(partition={"edge_head": 1, "edge_tail": 1, "chunks": 4}, link={"gradients": "int8"})
    times = [1e-5] * 4
    link = LinkSpec(up_mbps=10.0, down_mbps=10.0, rtt_ms=1.0)
    edge, cloud = _profile(config, times, times), _profile(config, times, times)
    training = predict(config, edge, cloud, link)
    frozen = predict(config, edge, cloud, link, head_trains=False)
    gradient = payload_bytes("int8", (8, *HEAD_OUT)) + 8 * 4 + FRAME_OVERHEAD_BYTES  # 8 channel scales
    assert training.downlink_bytes - frozen.downlink_bytes == 4 * gradient
    assert frozen.uplink_bytes == training.uplink_bytes
    assert frozen.busy_seconds["edge"] < training.busy_seconds["edge"]
    assert frozen.step_seconds < training.step_seconds
    # Without a head there is no head gradient to send, frozen or not.
    no_head = make_config(partition={"edge_head": 0, "edge_tail": 1, "chunks": 4})
    frozen_no_head = predict(no_head, edge, cloud, link, head_trains=False)
    assert predict(no_head, edge, cloud, link).downlink_bytes == frozen_no_head.downlink_bytes


def test_bytes_per_step_are_the_codecs_payload_scales_and_framing() -> None:
    # 30 samples in 4 chunks: torch.chunk makes 8, 8, 8 and 6.
    config = make_config(
        partition={"edge_head": 1, "edge_tail": 1, "chunks": 4},
        link={"uplink": "int4", "downlink": "fp16", "gradients": "int8"},
        train={"batch_size": 30},
    )
    times = [1e-5] * 4
    got = predict(config, _profile(config, times, times), _profile(config, times, times), LinkSpec(10, 10, 0))

    def frame(codec: str, role: str, shape: tuple[int, ...]) -> int:
        encoded = encode(torch.randn(shape), codec, role)  # type: ignore[arg-type]
        assert len(encoded.data) == payload_bytes(codec, shape)
        return len(encoded.data) + 4 * (len(encoded.scale) + len(encoded.zero_point)) + FRAME_OVERHEAD_BYTES

    sizes = [8, 8, 8, 6]
    up = sum(frame("int4", "activation", (n, *HEAD_OUT)) + frame("int8", "gradient", (n, *MIDDLE_OUT)) for n in sizes)
    down = sum(frame("fp16", "activation", (n, *MIDDLE_OUT)) + frame("int8", "gradient", (n, *HEAD_OUT)) for n in sizes)
    assert (got.uplink_bytes, got.downlink_bytes) == (up + CONTROL_UP, down + CONTROL_DOWN)


def test_with_the_loss_on_the_cloud_only_activations_and_labels_go_up() -> None:
    config = make_config(partition={"edge_head": 1, "edge_tail": 0, "chunks": 2})
    times = [1e-5] * 4
    got = predict(config, _profile(config, times, times), _profile(config, times, times), LinkSpec(10, 10, 0))
    assert got.uplink_bytes == 2 * (_fp32((16, *HEAD_OUT)) + 16) + CONTROL_UP  # one byte a label
    assert got.downlink_bytes == 2 * _fp32((16, *HEAD_OUT)) + CONTROL_DOWN


# -- enumeration -----------------------------------------------------------------------------------


def test_plan_enumerates_every_allowed_cut_chunk_count_and_codec() -> None:
    config = make_config(train={"batch_size": 6})
    times = [1e-5] * 4
    edge, cloud = _profile(config, times, times), _profile(config, times, times)
    candidates = plan(config, edge, cloud, LinkSpec(5, 20, 10))
    cuts = {(c.edge_head, c.edge_tail) for c in candidates}
    assert cuts == {(h, t) for h in range(4) for t in range(4) if h + t <= 3}
    assert {c.chunks for c in candidates} == {1, 2, 4}  # 8 and 16 exceed the batch of 6
    assert {c.uplink for c in candidates} == set(UPLINK_CODECS)
    assert {c.downlink for c in candidates} == {"fp32"}
    # Two gradient codecs wherever a gradient crosses; only (0, 0) sends none.
    assert len(candidates) == 3 * 5 * (2 * (len(cuts) - 1) + 1)
    assert {c.gradients for c in candidates if (c.edge_head, c.edge_tail) == (0, 0)} == {"fp32"}
    assert {c.gradients for c in candidates} == set(GRADIENT_CODECS)
    steps = [c.step_seconds for c in candidates]
    assert steps == sorted(steps)
    kept = plan(config, edge, cloud, LinkSpec(5, 20, 10), min_edge_head=1, min_edge_tail=1)
    assert {(c.edge_head, c.edge_tail) for c in kept} == {(1, 1), (1, 2), (2, 1)}


def test_plan_leaves_out_cuts_whose_frames_startup_would_refuse() -> None:
    config = make_config(model={"input_shape": [1, 64, 64]}, link={"max_message_mib": 1})
    times = [1e-5] * 4
    candidates = plan(config, _profile(config, times, times), _profile(config, times, times), LinkSpec(5, 20, 10))
    model = build_configured(config.model)
    kept = {(c.edge_head, c.edge_tail, c.chunks) for c in candidates}
    # The head output is 128 KiB a sample: 32 samples need 4 MiB, 8 samples still 1 MiB plus framing.
    assert (1, 1, 8) in kept and not {(1, 1, 1), (1, 1, 2), (1, 1, 4)} & kept
    for head, tail, chunks in [(1, 1, 8), (1, 1, 4)]:
        candidate = make_config(
            model={"input_shape": [1, 64, 64]},
            link={"max_message_mib": 1},
            partition={"edge_head": head, "edge_tail": tail, "chunks": chunks},
        )
        if (head, tail, chunks) in kept:
            message_limit(candidate, model)
        else:
            with pytest.raises(ConfigError, match="max_message_mib"):
                message_limit(candidate, model)


def test_objective_bytes_picks_the_smallest_codecs_and_a_deep_cut() -> None:
    config = make_config()
    times = [1e-5] * 4
    edge, cloud = _profile(config, times, times), _profile(config, times, times)
    link = LinkSpec(5, 20, 10)
    kept = plan(config, edge, cloud, link, objective="bytes", min_edge_head=1, min_edge_tail=1)
    best = kept[0]
    # block2's output (256 values) is half block1's: the cut after it sends fewer bytes.
    assert (best.edge_head, best.edge_tail, best.uplink, best.gradients) == (2, 1, "int4", "int8")
    assert best.total_bytes == min(c.total_bytes for c in kept)
    assert [c.total_bytes for c in kept] == sorted(c.total_bytes for c in kept)
    anything = plan(config, edge, cloud, link, objective="bytes")[0]
    # Unconstrained, fewest bytes means sending the raw 8x8 inputs (int4) and computing the loss there.
    assert (anything.edge_head, anything.edge_tail, anything.uplink) == (0, 0, "int4")


def test_to_config_changes_only_the_partition_and_codecs() -> None:
    config = make_config(train={"lr": 0.01})
    times = [1e-5] * 4
    best = plan(config, _profile(config, times, times), _profile(config, times, times), LinkSpec(5, 20, 10))[0]
    planned = best.to_config(config)
    assert (planned.partition.edge_head, planned.partition.edge_tail, planned.partition.chunks) == (
        best.edge_head,
        best.edge_tail,
        best.chunks,
    )
    assert (planned.link.uplink, planned.link.gradients) == (best.uplink, best.gradients)
    assert planned.train == config.train and planned.model == config.model and planned.skip == config.skip


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"model_name": "resnet18"}, "model 'resnet18'"),
        ({"input_shape": [1, 16, 16]}, r"input_shape \[1, 16, 16\]"),
    ],
)
def test_plan_refuses_a_profile_of_another_model(fields: dict[str, object], match: str) -> None:
    config = make_config()
    times = [1e-5] * 4
    with pytest.raises(ProfileError, match=f"the cloud profile.*{match}"):
        plan(config, _profile(config, times, times), _profile(config, times, times, **fields), LinkSpec(5, 20, 10))


def test_plan_refuses_a_profile_of_another_width() -> None:
    config, wider = make_config(), make_config(model={"width": 2.0})
    times = [1e-5] * 4
    with pytest.raises(ProfileError, match="the edge profile.*layer 0.*another width"):
        plan(config, _profile(wider, times, times), _profile(config, times, times), LinkSpec(5, 20, 10))


@pytest.mark.parametrize(
    ("rates", "match"),
    [
        ((-1.0, 1.0, 0.0), "up_mbps"),
        ((1.0, 0.0, 0.0), "down_mbps"),
        ((1.0, 1.0, -1.0), "rtt_ms"),
        ((1.0, math.inf, 0), "down_mbps"),
    ],
)
def test_link_spec_refuses_impossible_links(rates: tuple[float, float, float], match: str) -> None:
    with pytest.raises(PlanError, match=match):
        LinkSpec(*rates)


# -- device profiles -------------------------------------------------------------------------------


def test_profile_layers_measures_every_layer_and_round_trips_through_json(tmp_path: Path) -> None:
    config = make_config()
    model = build_configured(config.model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    measured = profile_layers(model, config.model.input_shape, 8, model_name="tinycnn", repeats=1)
    assert measured.batch_sizes == measured_sizes(8) == [2, 8]
    assert measured.num_layers == 4 and measured.torch_threads == torch.get_num_threads()
    shapes = profile(model, config.model.input_shape)
    assert [layer.output_bytes for layer in measured.layers] == [p.output_bytes for p in shapes]
    assert all(t > 0 for layer in measured.layers for t in layer.forward_seconds)
    # Every layer of tinycnn has parameters or an input that needs a gradient.
    assert all(t > 0 for layer in measured.layers for t in layer.backward_seconds)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    path = tmp_path / "edge.json"
    measured.save(path)
    assert DeviceProfile.load(path) == measured


def test_times_are_fitted_linear_in_the_micro_batch_size() -> None:
    config = make_config()
    base = _profile(config, [0.0] * 4, [0.0] * 4)
    layers = [
        layer.model_copy(update={"forward_seconds": [1.0 + 2 * 0.5, 1.0 + 32 * 0.5], "backward_seconds": [3.0, 2.0]})
        for layer in base.layers
    ]
    fitted = base.model_copy(update={"batch_sizes": [2, 32], "layers": layers})
    assert fitted.forward_seconds(0, 8) == pytest.approx(1.0 + 8 * 0.5)
    assert fitted.backward_seconds(0, 8) == pytest.approx(2.5)  # a falling time is noise: its mean


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda data: "{not json", ["Invalid JSON"]),
        (lambda data: {**data, "num_layers": "four"}, ["num_layers"]),
        (lambda data: {k: v for k, v in data.items() if k != "model_name"}, ["model_name", "Field required"]),
        (
            lambda data: {**data, "layers": [{**data["layers"][0], "forward_seconds": ["fast"]}, *data["layers"][1:]]},
            ["layers.0.forward_seconds.0"],
        ),
        (lambda data: {**data, "layers": data["layers"][:3]}, ["indexes 0..3"]),
        (lambda data: {**data, "batch_sizes": [1, 2]}, ["layers.0.forward_seconds has 1 entries"]),
        (lambda data: {**data, "speed": 1}, ["speed", "Extra inputs"]),
    ],
)
def test_a_malformed_profile_is_an_error_naming_the_file_and_the_field(tmp_path: Path, edit, words: list[str]) -> None:
    config = make_config()
    data = json.loads(_profile(config, [1e-5] * 4, [1e-5] * 4).model_dump_json())
    path = tmp_path / "broken.json"
    edited = edit(data)
    path.write_text(edited if isinstance(edited, str) else json.dumps(edited), encoding="utf-8")
    with pytest.raises(ProfileError) as error:
        DeviceProfile.load(path)
    message = str(error.value)
    assert "\n" not in message and str(path) in message
    for word in words:
        assert word in message


@pytest.mark.parametrize(("options", "match"), [({"device": "abacus"}, "abacus"), ({"repeats": 0}, "repeats")])
def test_profile_layers_refuses_a_bad_device_or_repeat_count(options: dict[str, object], match: str) -> None:
    config = make_config()
    with pytest.raises(ProfileError, match=match):
        profile_layers(build_configured(config.model), config.model.input_shape, 8, model_name="tinycnn", **options)


def test_a_missing_profile_is_an_error_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match=r"cannot read device profile .*nothing\.json"):
        DeviceProfile.load(tmp_path / "nothing.json")


# -- the commands ----------------------------------------------------------------------------------


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="edgepipe partition")
    add_partition_commands(parser.add_subparsers(dest="action", required=True))
    args = parser.parse_args(argv)
    return args.run(args)


def _plan_argv(config: Path, edge: Path, cloud: Path, *more: str) -> list[str]:
    return [
        "plan", "--config", str(config), "--edge-profile", str(edge), "--cloud-profile", str(cloud),
        "--up-mbps", "10", "--down-mbps", "40", "--rtt-ms", "20", *more,
    ]  # fmt: skip


def test_profile_then_plan_writes_a_config_that_loads(tmp_path: Path, capsys) -> None:
    config_path = tmp_path / "config.toml"
    config_path.write_text(SMALL_TOML.format(edge_head=1), encoding="utf-8")
    profile_path, out = tmp_path / "edge.json", tmp_path / "best.toml"
    assert _run(["profile", "--config", str(config_path), "--repeats", "1", "--out", str(profile_path)]) == 0
    printed = capsys.readouterr().out
    assert all(name in printed for name in ("block1", "block2", "pool", "fc")) and f"wrote {profile_path}" in printed
    measured = DeviceProfile.load(profile_path)

    more = ["--top", "3", "--min-edge-tail", "1", "--write", str(out)]
    assert _run(_plan_argv(config_path, profile_path, profile_path, *more)) == 0
    printed = capsys.readouterr().out
    assert "step ms" in printed and "bottleneck" in printed and "config" in printed
    written = load_config(out)
    config = load_config(config_path)
    best = plan(config, measured, measured, LinkSpec(10, 40, 20), min_edge_tail=1)[0]
    assert written == best.to_config(config)
    assert written.partition.edge_tail >= 1


def test_plan_command_bad_input_is_one_line_and_exit_2(tmp_path: Path, capsys) -> None:
    config_path = tmp_path / "config.toml"
    config_path.write_text(SMALL_TOML.format(edge_head=1), encoding="utf-8")
    config = load_config(config_path)
    ours, other = tmp_path / "ours.json", tmp_path / "other.json"
    _profile(config, [1e-5] * 4, [1e-5] * 4).save(ours)
    _profile(config, [1e-5] * 4, [1e-5] * 4, model_name="mobilenetv2").save(other)
    for argv, words in [
        (_plan_argv(config_path, ours, other), ["cloud profile", "mobilenetv2"]),
        (_plan_argv(config_path, tmp_path / "gone.json", ours), ["gone.json"]),
        (_plan_argv(config_path, ours, ours)[:-1] + ["-5"], ["rtt_ms"]),
        (_plan_argv(tmp_path / "none.toml", ours, ours), ["none.toml"]),
    ]:
        assert _run(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("edgepipe: ") and "\n" not in err
        assert all(word in err for word in words), err
    with pytest.raises(SystemExit) as exit_:
        _run(_plan_argv(config_path, ours, ours, "--up-mbps", "-1"))
    assert exit_.value.code == 2
    assert "--up-mbps: must be greater than 0" in capsys.readouterr().err


def test_plan_command_ranks_even_when_the_configured_split_is_impossible(tmp_path: Path, capsys) -> None:
    config_path = tmp_path / "config.toml"
    config_path.write_text(SMALL_TOML.format(edge_head=3), encoding="utf-8")  # 3 + 1 of 4 layers: no cloud layer
    ours = tmp_path / "ours.json"
    _profile(load_config(config_path), [1e-5] * 4, [1e-5] * 4).save(ours)
    assert _run(_plan_argv(config_path, ours, ours, "--top", "2")) == 0
    printed = capsys.readouterr().out
    assert "best 2 of" in printed and "config" not in printed.split("bottleneck")[-1]
