"""The cloud's half of checkpoints and resume over real gRPC: saved at checkpoint steps, owned, restored bit for bit."""
from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from edgepipe.launch import start_cloud, stop
from pipeline.checkpoints import PAUSE_ENV, CheckpointStore
from pipeline.config import Config, load_config
from pipeline.handshake import fingerprint
from protos import edgepipe_pb2 as pb
from tests.conftest import SMALL_TOML, EdgeTokens
from tests.raw_client import CHUNKS, SAMPLES, STEPS_PER_EPOCH, TIMEOUT, RawClient, expect_status, model_of

ROOT = Path(__file__).resolve().parent.parent
FAILED = grpc.StatusCode.FAILED_PRECONDITION

#: Stochastic int8 gradients both ways; layers 0 and 1 (the edge head and the cloud's first)
#: slowed at steps 2 and 3 and frozen from step 4 on: the rounding generator, the saved decision
#: and the optimizer's parameter groups all matter to what a resumed session sends.
CONFIG = SMALL_TOML.format(edge_head=1) + """
[link]
gradients = "int8-sr"

[skip]
policy = "manual"
stop_layers = [1]
stop_steps = [4]
braking_distance = 3
"""
#: Steps the tests drive; all inside the raw client's first epoch (no epoch-end statistics).
STEPS = 6
#: The boundary the cloud decides for each step under CONFIG.
BOUNDARY = [0, 0, 0, 0, 2, 2]


@pytest.fixture(scope="module")
def config_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("config") / "config.toml"
    path.write_text(CONFIG, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def config(config_path: Path) -> Config:
    return load_config(config_path)


def new_run() -> str:
    return uuid.uuid4().hex


def open_run(client: RawClient, run_id: str, resume_step: int | None = None, **fields: Any) -> pb.OpenReply:
    """Open run ``run_id``: fresh, or resumed after ``resume_step``; ``fields`` override the request's."""
    request = client.open_request()
    request.run_id = run_id
    if resume_step is not None:
        request.resume, request.resume_step = True, resume_step
    for name, value in fields.items():
        setattr(request, name, value)
    return client.stub.Open(request, timeout=TIMEOUT, metadata=client.metadata)


def frames(client: RawClient, session: str, step: int, *, checkpoint: bool = False) -> list[pb.StepFrame]:
    """Step ``step`` as an edge of CONFIG sends it: the same tensors whenever it is sent again."""
    lr, boundary = client.config.train.lr, BOUNDARY[step]
    begin = pb.StepBegin(epoch=step // STEPS_PER_EPOCH, lr=lr, chunks=CHUNKS, boundary=boundary, samples=SAMPLES)
    out = [pb.StepFrame(session=session, step=step, begin=begin)]
    for i in range(CHUNKS):
        activation = client.activation(seed=100 * step + i)
        out.append(pb.StepFrame(session=session, step=step, micro_batch=i, activation=activation))
    for i in range(CHUNKS):
        gradient = client.gradient(seed=100 * step + i)
        out.append(pb.StepFrame(session=session, step=step, micro_batch=i, gradient=gradient))
    out.append(pb.StepFrame(session=session, step=step, end=pb.StepEnd(checkpoint=checkpoint)))
    return out


def answers(replies: list[pb.StepFrame]) -> list[tuple[Any, ...]]:
    """What a step's replies carry, timing apart: tensors' bytes, the loss and the decision."""
    kept = []
    for reply in replies:
        kind = reply.WhichOneof("body")
        if kind == "done":
            kept.append((kind, reply.done.loss, reply.done.decision.SerializeToString()))
        else:
            tensor = getattr(reply, kind)
            kept.append((kind, reply.micro_batch, bytes(tensor.data), tuple(tensor.scale)))
    return kept


def run_steps(
    client: RawClient, session: str, steps: range, checkpoints: Collection[int] = ()
) -> list[list[pb.StepFrame]]:
    """Each step's replies; the steps in ``checkpoints`` ask for one."""
    return [client.step(frames(client, session, step, checkpoint=step in checkpoints)) for step in steps]


def weights(client: RawClient, session: str) -> dict[str, torch.Tensor]:
    """The session's middle, decoded from the Weights call's raw tensors."""
    entries = client.stub.Weights(pb.SessionRef(session=session), timeout=TIMEOUT, metadata=client.metadata)
    return {
        e.name: torch.frombuffer(bytearray(e.tensor.data), dtype=getattr(torch, e.tensor.dtype)).reshape(
            tuple(e.tensor.shape)
        )
        for e in entries
    }


def assert_equal_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[name], b[name]) for name in a), [name for name in a if not torch.equal(a[name], b[name])]


@pytest.fixture
def client_of() -> Iterator[Callable[..., RawClient]]:
    clients: list[RawClient] = []

    def make(address: str, config: Config, **options: Any) -> RawClient:
        clients.append(RawClient(address, config, **options))
        return clients[-1]

    yield make
    for client in clients:
        client.close()


# -- saving --------------------------------------------------------------------------------------


def test_a_checkpoint_step_saves_the_cloud_half_before_it_answers(
    cloud_server, client_of, config, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    address, _ = cloud_server(config, state_dir=state)
    client = client_of(address, config)
    run_id = new_run()
    reply = open_run(client, run_id)
    assert reply.next_step == 0
    replies = run_steps(client, reply.session, range(5), checkpoints={1, 2, 4})

    done = [r[-1].done for r in replies]
    assert [d.checkpointed for d in done] == [False, True, True, False, True]
    store = CheckpointStore(state / "local" / run_id)
    assert store.steps() == [2, 4], "pruned to [checkpoint] keep = 2"
    assert sorted(p.name for p in store.directory.glob("step-*")) == [
        "step-00000002.json", "step-00000002.pt", "step-00000004.json", "step-00000004.pt",
    ]
    tensors, meta = store.load(4)
    assert set(tensors) == {"middle", "optimizer", "statistics", "rounding"}
    assert_equal_weights(tensors["middle"], weights(client, reply.session))
    # Step 4's decision froze the cloud's only layer with weights: its optimizer holds a placeholder.
    assert tensors["optimizer"]["state"] == {} and tensors["optimizer"]["param_groups"][0]["layer"] == -1
    earlier, earlier_meta = store.load(2)
    assert earlier["optimizer"]["state"], "momentum buffers are saved"
    assert tensors["rounding"].dtype == torch.uint8
    assert meta["run_id"] == run_id and meta["step"] == 4 and meta["next_step"] == 5
    assert meta["decision"]["boundary"] == 2 and meta["decision"]["lr_factors"] == []
    # Braking slows every tensor of the two layers about to stop (tinycnn: 8 tensors).
    assert earlier_meta["decision"]["boundary"] == 0
    assert earlier_meta["decision"]["lr_factors"] == [[i, (1 / 3) ** 2] for i in range(8)]
    # The tensor prefix is kept too, so a resumed run knows exactly what it froze.
    assert meta["decision"]["frozen_parameters"] == 8 and earlier_meta["decision"]["frozen_parameters"] == 0
    assert meta["policy"]["policy"] == "manual"
    assert meta["fingerprint"] == fingerprint(config, model_of(config)) and meta["config"] == config.agreed()
    assert (meta["total_steps"], meta["steps_per_epoch"]) == (100, STEPS_PER_EPOCH)


def test_the_done_frame_carries_the_clouds_spans(cloud_server, client_of, config) -> None:
    address, _ = cloud_server(config)
    client = client_of(address, config)
    session = open_run(client, new_run()).session
    spans = run_steps(client, session, range(1))[0][-1].done.spans
    for name in ("decode", "forward", "backward", "encode"):
        assert sorted(s.micro_batch for s in spans if s.name == name) == sorted(
            [*range(CHUNKS)] * (2 if name in ("decode", "encode") else 1)
        ), name
    (end,) = [s for s in spans if s.name == "end"]
    assert end.micro_batch == -1
    assert all(0 <= s.start <= s.end <= end.end for s in spans)
    assert max(s.end for s in spans if s.name != "end") <= end.start


def test_a_cloud_without_a_state_directory_trains_a_checkpoint_step_and_says_it_did_not_save(
    cloud_server, client_of, config
) -> None:
    address, _ = cloud_server(config)
    client = client_of(address, config)
    session = open_run(client, new_run()).session
    before = weights(client, session)
    replies = client.step(frames(client, session, 0, checkpoint=True))
    assert replies[-1].WhichOneof("body") == "done" and not replies[-1].done.checkpointed
    after = weights(client, session)
    assert not all(torch.equal(after[k], before[k]) for k in before), "the step trained"
    # Nor can a resume find anything on it.
    assert "start it with --state-dir" in expect_status(lambda: open_run(client, new_run(), 0), FAILED)


def test_a_session_opened_without_a_run_id_trains_but_keeps_no_checkpoint(
    cloud_server, client_of, config, tmp_path: Path
) -> None:
    address, _ = cloud_server(config, state_dir=tmp_path / "state")
    client = client_of(address, config)
    session = client.open()
    replies = client.step(frames(client, session, 0, checkpoint=True))
    assert not replies[-1].done.checkpointed
    assert list((tmp_path / "state").iterdir()) == []


def test_a_checkpoint_the_cloud_cannot_write_is_aborted_without_its_paths(
    cloud_server, client_of, config, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    address, _ = cloud_server(config, state_dir=state)
    client = client_of(address, config)
    run_id = new_run()
    session = open_run(client, run_id).session
    (state / "local").mkdir()
    (state / "local" / run_id).write_text("in the way")
    details = expect_status(lambda: client.step(frames(client, session, 0, checkpoint=True)), grpc.StatusCode.ABORTED)
    assert details == "the cloud could not save its half of step 0 (File exists)"
    assert str(tmp_path) not in details


# -- resuming: what is refused, and to whom --------------------------------------------------------


@pytest.mark.parametrize("run_id", ["../../etc", "A" * 32, "0" * 31, "0" * 33, "0" * 31 + "/", "g" * 32])
def test_a_bad_run_id_is_invalid_argument_before_it_becomes_a_path(
    cloud_server, client_of, config, tmp_path: Path, run_id: str
) -> None:
    state = tmp_path / "state"
    address, _ = cloud_server(config, state_dir=state)
    client = client_of(address, config)
    for resume_step in (None, 0):
        assert "32 lowercase hex digits" in expect_status(
            lambda: open_run(client, run_id, resume_step), grpc.StatusCode.INVALID_ARGUMENT
        )
    assert "32 lowercase hex digits" in expect_status(
        lambda: open_run(client, "", 0), grpc.StatusCode.INVALID_ARGUMENT
    ), "a resume names its run"
    assert list(state.iterdir()) == []


def test_a_resume_names_the_steps_the_cloud_holds(cloud_server, client_of, config, tmp_path: Path) -> None:
    address, _ = cloud_server(config, state_dir=tmp_path / "state")
    client = client_of(address, config)
    run_id, unknown = new_run(), new_run()
    run_steps(client, open_run(client, run_id).session, range(3), checkpoints={0, 1})

    unknown_details = expect_status(lambda: open_run(client, unknown, 1), FAILED)
    assert unknown_details == f"no checkpoints of run {unknown} on this cloud"
    assert expect_status(lambda: open_run(client, run_id, 2), FAILED) == (
        f"run {run_id} has no checkpoint of step 2 on this cloud; it holds steps 0, 1"
    )
    lengths = expect_status(lambda: open_run(client, run_id, 1, total_steps=50), FAILED)
    assert "total_steps 100" in lengths and "50" in lengths
    assert open_run(client, run_id, 1).next_step == 2


def test_another_identity_can_neither_resume_nor_learn_of_nor_erase_a_run(
    cloud_server, client_of, config, edge_tokens: EdgeTokens, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    address, _ = cloud_server(config, edges=edge_tokens.registry, state_dir=state)
    alice = client_of(address, config, token=edge_tokens.tokens["alice"])
    bob = client_of(address, config, token=edge_tokens.tokens["bob"])
    stranger = client_of(address, config, token="not-a-token")
    run_id, unknown = new_run(), new_run()
    run_steps(alice, open_run(alice, run_id).session, range(2), checkpoints={0, 1})

    # Bob hears exactly what he would of a run nobody has: not that it exists, nor its steps.
    stolen = expect_status(lambda: open_run(bob, run_id, 1), FAILED)
    assert stolen == expect_status(lambda: open_run(bob, unknown, 1), FAILED).replace(unknown, run_id)
    assert "0, 1" not in stolen
    details = expect_status(lambda: open_run(stranger, run_id, 1), grpc.StatusCode.UNAUTHENTICATED)
    assert run_id not in details and "step" not in details
    # Bob starting "the same" run starts his own: Alice's checkpoints stay, and she resumes.
    bob_session = open_run(bob, run_id).session
    run_steps(bob, bob_session, range(1), checkpoints={0})
    assert CheckpointStore(state / "alice" / run_id).steps() == [0, 1]
    assert CheckpointStore(state / "bob" / run_id).steps() == [0]
    assert open_run(alice, run_id, 1).next_step == 2


def test_a_checkpoint_of_another_configuration_is_refused_naming_what_differs(
    cloud_server, client_of, config, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    address, _ = cloud_server(config, state_dir=state)
    run_id = new_run()
    client = client_of(address, config)
    run_steps(client, open_run(client, run_id).session, range(1), checkpoints={0})

    changed_path = tmp_path / "changed.toml"
    changed_path.write_text(CONFIG.replace("lr = 0.05", "lr = 0.1"), encoding="utf-8")
    changed = load_config(changed_path)
    address, _ = cloud_server(changed, state_dir=state)
    details = expect_status(lambda: open_run(client_of(address, changed), run_id, 0), FAILED)
    assert "train.lr" in details and "0.05" in details and "0.1" in details


# -- resuming: the run continues bit for bit -------------------------------------------------------


def test_a_fresh_open_of_a_run_starts_it_over_and_replaces_its_session(
    cloud_server, client_of, config, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    address, _ = cloud_server(config, state_dir=state)
    client = client_of(address, config)
    run_id = new_run()
    first = open_run(client, run_id).session
    reference = answers([r for step in run_steps(client, first, range(3), checkpoints={2}) for r in step])
    assert CheckpointStore(state / "local" / run_id).steps() == [2]

    again = open_run(client, run_id)
    assert again.next_step == 0
    assert not (state / "local" / run_id).exists(), "the run starts over without its old checkpoints"
    expect_status(lambda: client.weights(first), grpc.StatusCode.NOT_FOUND)
    again_replies = run_steps(client, again.session, range(3), checkpoints={2})
    assert answers([r for step in again_replies for r in step]) == reference
    assert CheckpointStore(state / "local" / run_id).steps() == [2]


def test_a_resumed_session_continues_bit_for_bit(cloud_server, client_of, config, tmp_path: Path) -> None:
    state = tmp_path / "state"
    address, _ = cloud_server(config, state_dir=state)
    client = client_of(address, config)
    reference = open_run(client, new_run()).session
    expected = [answers(r) for r in run_steps(client, reference, range(STEPS))]

    run_id = new_run()
    interrupted = open_run(client, run_id).session
    # Step 3 is saved by the cloud but never committed by the edge: the resume after 2 drops it.
    run_steps(client, interrupted, range(4), checkpoints={1, 2, 3})
    resumed = open_run(client, run_id, 2)
    assert resumed.next_step == 3
    assert {f.parameter: f.factor for f in resumed.decision.lr_factors} == dict.fromkeys(range(8), (1 / 3) ** 2)
    assert CheckpointStore(state / "local" / run_id).steps() == [2]
    expect_status(lambda: client.weights(interrupted), grpc.StatusCode.NOT_FOUND)
    assert [answers(r) for r in run_steps(client, resumed.session, range(3, STEPS), checkpoints={4})] == expected[3:]

    # Once more after step 4, with the cloud's first layer frozen: its optimizer has other groups now.
    again = open_run(client, run_id, 4)
    assert (again.next_step, again.decision.boundary) == (5, BOUNDARY[5])
    assert [answers(r) for r in run_steps(client, again.session, range(5, STEPS))] == expected[5:]
    assert_equal_weights(weights(client, again.session), weights(client, reference))


def test_checkpoints_outlive_the_session_reaper(cloud_server, client_of, config, tmp_path: Path) -> None:
    address, servicer = cloud_server(config, state_dir=tmp_path / "state")
    reaped: list[str] = []
    servicer.sessions.on_reap = reaped.append
    client = client_of(address, config)
    run_id = new_run()
    vanished = open_run(client, run_id).session
    expected = [answers(r) for r in run_steps(client, vanished, range(2), checkpoints={0})][1]
    # The edge vanishes and its session idles past the bound: the reaper's pass closes it (run
    # here, not on the reaper's clock, so that no other session of the test can idle that long).
    idle = servicer.sessions.idle_seconds
    servicer.sessions.idle_seconds = 0.0
    servicer.sessions.reap()
    servicer.sessions.idle_seconds = idle
    assert reaped == [vanished]
    expect_status(lambda: client.weights(vanished), grpc.StatusCode.NOT_FOUND)
    resumed = open_run(client, run_id, 0)
    assert resumed.next_step == 1
    assert answers(client.step(frames(client, resumed.session, 1))) == expected


def _wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 60
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)  # poll interval only: the loop waits for the condition


def test_a_cloud_killed_anywhere_resumes_the_run_from_its_state_directory(
    config_path: Path, config, client_of, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state, pause = tmp_path / "state", tmp_path / "pause"
    monkeypatch.delenv(PAUSE_ENV, raising=False)

    def start(*, paused: bool = False) -> tuple[Any, RawClient]:
        with monkeypatch.context() as env:
            if paused:
                pause.mkdir()
                env.setenv(PAUSE_ENV, str(pause))
            cloud, address = start_cloud(config_path, stderr=tmp_path / f"cloud-{time.monotonic_ns()}.log", cwd=ROOT,
                                         extra=["--state-dir", str(state)])
        clouds.append(cloud)
        return cloud, client_of(address, config)

    clouds: list[Any] = []
    try:
        cloud, client = start()
        reference = open_run(client, new_run()).session
        expected = [answers(r) for r in run_steps(client, reference, range(STEPS))]
        expected_weights = weights(client, reference)
        run_id = new_run()
        run_steps(client, open_run(client, run_id).session, range(3), checkpoints={2})
        cloud.kill()
        assert cloud.wait(timeout=60) < 0

        # The next cloud resumes, and is killed inside its checkpoint write of step 3.
        cloud, client = start(paused=True)
        resumed = open_run(client, run_id, 2).session
        failures: list[grpc.RpcError] = []

        def step_3() -> None:
            try:
                client.step(frames(client, resumed, 3, checkpoint=True))
            except grpc.RpcError as exc:
                failures.append(exc)

        caller = threading.Thread(target=step_3)
        caller.start()
        _wait_for(lambda: any(pause.glob("paused-*-3")), "the checkpoint write of step 3")
        cloud.kill()
        caller.join(timeout=60)
        assert [f.code() for f in failures] == [grpc.StatusCode.UNAVAILABLE]

        cloud, client = start()
        assert "it holds steps 2" in expect_status(lambda: open_run(client, run_id, 3), FAILED)
        session = open_run(client, run_id, 2).session
        assert [answers(r) for r in run_steps(client, session, range(3, STEPS))] == expected[3:]
        assert_equal_weights(weights(client, session), expected_weights)
    finally:
        for cloud in clouds:
            stop(cloud)
