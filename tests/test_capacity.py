"""Nobody can block the cloud: idle bounds, stream caps per edge, atomic --max-sessions, the reaper, many edges."""
from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from cloud_node.capacity import UNARY_RESERVE, Capacity
from edge_node.link import LinkSecurity
from edge_node.worker import train
from edgepipe.cloud_cli import main as cloud_main
from protos import edgepipe_pb2 as pb
from tests.conftest import SMALL_TOML, EdgeTokens, make_config
from tests.raw_client import RawClient, begin, expect_status, run_good_step

#: The idle bound of these tests' clouds (link.timeout_seconds): short, so that cuts come soon,
#: long enough for a step of tinycnn on a loaded machine.
_IDLE = 1.5


def _blocked(release: threading.Event, first: list[bytes] | None = None) -> Iterator[bytes]:
    """Requests for a raw call: ``first``, then nothing until ``release`` is set."""
    yield from first or []
    release.wait()


def _raw(channel: grpc.Channel, kind: str, name: str):
    return getattr(channel, kind)(f"/edgepipe.v1.Cloud/{name}", request_serializer=None, response_deserializer=None)


def test_max_sessions_holds_under_concurrent_opens(cloud_server) -> None:
    config = make_config()
    address, servicer = cloud_server(config, max_sessions=8)
    clients = [RawClient(address, config) for _ in range(16)]
    start = threading.Barrier(16)

    def open_one(client: RawClient) -> grpc.StatusCode:
        start.wait()
        try:
            client.open()
        except grpc.RpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK

    try:
        with futures.ThreadPoolExecutor(16) as pool:
            codes = list(pool.map(open_one, clients))
    finally:
        for client in clients:
            client.close()
    assert codes.count(grpc.StatusCode.OK) == 8
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 8
    assert len(servicer.sessions) == 8


def test_sixteen_edges_train_at_once_with_the_default_flags(cloud, tmp_path: Path) -> None:
    config = make_config()
    address = cloud(config)
    start = threading.Barrier(16)

    def one_edge(index: int) -> int:
        start.wait()
        return train(config, run_dir=tmp_path / f"edge-{index}", cloud=address, max_steps=2)["steps"]

    with futures.ThreadPoolExecutor(16) as pool:
        steps = list(pool.map(one_edge, range(16)))
    assert steps == [2] * 16


def test_stalled_streams_of_one_edge_never_stop_another(cloud_server, edge_tokens: EdgeTokens, tmp_path: Path) -> None:
    # An idle bound far longer than the run: the stalled streams stay for all of it.
    config = make_config(link={"timeout_seconds": 60.0})
    address, servicer = cloud_server(config, edges=edge_tokens.registry, max_sessions=4)
    workers = servicer.capacity.workers
    mallory = RawClient(address, config, token=edge_tokens.tokens["mallory"])
    mallory.open()
    release = threading.Event()
    try:
        # As many silent streams as the cloud has threads.
        step = _raw(mallory.channel, "stream_stream", "Step")
        stalled = [step(_blocked(release), metadata=mallory.metadata, timeout=120) for _ in range(workers)]
        # Meanwhile another edge trains to the end.
        security = LinkSecurity(token=edge_tokens.tokens["alice"])
        summary = train(config, run_dir=tmp_path / "alice", cloud=address, max_steps=4, security=security)
        assert summary["steps"] == 4
        # Mallory holds two streams for its one session plus two, and they are still open;
        # every other stream was refused at once.
        held = [call for call in stalled if not call.done()]
        assert len(held) == 4
        refused = [call for call in stalled if call.done()]
        assert {call.code() for call in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert "this edge already holds 4 streams" in refused[0].details()
    finally:
        release.set()
        mallory.close()


def test_a_stream_is_cut_when_its_peer_stops_sending(cloud_server) -> None:
    config = make_config(link={"timeout_seconds": _IDLE})
    address, _ = cloud_server(config)
    client = RawClient(address, config)
    session = client.open()
    release = threading.Event()
    try:
        # A begin frame and then nothing, a stream without a frame, an evaluation without one.
        for name, first in (("Step", [begin(session).SerializeToString()]), ("Step", []), ("Evaluate", [])):
            started = time.monotonic()
            call = _raw(client.channel, "stream_stream", name)(_blocked(release, first), timeout=60)
            assert call.code() == grpc.StatusCode.CANCELLED, name
            assert _IDLE <= time.monotonic() - started < _IDLE + 10, name
        # A unary call whose request never comes (headers only) holds no thread for longer either.
        started = time.monotonic()
        call = _raw(client.channel, "stream_unary", "Open").future(_blocked(release), timeout=60)
        assert call.exception(timeout=_IDLE + 10).code() == grpc.StatusCode.CANCELLED
        assert time.monotonic() - started >= _IDLE
        # The cut step was aborted: the session is at step 0, not inside a half-done step.
        run_good_step(client, session, step=0)
    finally:
        release.set()
        client.close()


def test_a_stream_is_cut_when_its_peer_stops_reading(cloud_server) -> None:
    config = make_config(link={"timeout_seconds": _IDLE})
    address, servicer = cloud_server(config)
    cut = threading.Event()
    servicer.watch.on_cut = cut.set
    client = RawClient(address, config)
    session = client.open()
    frame = pb.EvalFrame(session=session, batch=0, activation=client.activation())
    requests: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
    try:
        # Far more evaluation replies than flow control lets through to a client that reads none.
        for _ in range(4000):
            requests.put(frame.SerializeToString())
        started = time.monotonic()
        unread = _raw(client.channel, "stream_stream", "Evaluate")(iter(requests.get, None), timeout=120)
        assert cut.wait(timeout=_IDLE + 20)
        assert time.monotonic() - started >= _IDLE
        # The cut stream let go of the session: a new evaluation stream is served.
        assert len(client.evaluate([frame])) == 1
        unread.cancel()
    finally:
        requests.put(None)
        client.close()


def test_sessions_of_a_vanished_edge_are_reaped(cloud_server) -> None:
    config = make_config()
    address, servicer = cloud_server(config, session_idle_seconds=0.5)
    reaped: queue.SimpleQueue[str] = queue.SimpleQueue()
    servicer.sessions.on_reap = reaped.put
    client = RawClient(address, config)
    try:
        session = client.open()
        run_good_step(client, session)
        # The edge vanishes without Close: the reaper frees its session by itself.
        assert reaped.get(timeout=30) == session
        assert len(servicer.sessions) == 0
        expect_status(lambda: client.weights(session), grpc.StatusCode.NOT_FOUND)
    finally:
        client.close()


def test_workers_too_few_for_max_sessions_are_refused(tmp_path: Path, capsys) -> None:
    with pytest.raises(ValueError, match="--workers 10"):
        Capacity.plan(max_sessions=8, workers=10)
    plan = Capacity.plan(max_sessions=8)
    assert plan.stream_slots >= 2 * 8 and plan.workers == plan.stream_slots + UNARY_RESERVE
    path = tmp_path / "cloud.toml"
    path.write_text(SMALL_TOML.format(edge_head=1))
    assert cloud_main(["--config", str(path), "--listen", "127.0.0.1:0", "--max-sessions", "8", "--workers", "10"]) == 2
    assert "--workers 10 is too few" in capsys.readouterr().err
