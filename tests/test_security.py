"""The cloud on an open network: TLS and mutual TLS, tokens, whose session is whose, what an outsider learns."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cloud_node.refusal import DETAIL_CHARS
from cloud_node.servicer import serve
from edge_node.link import LinkSecurity
from edge_node.worker import train
from edgepipe.cloud_cli import main as cloud_main
from pipeline.trust import TrustError
from protos import edgepipe_pb2 as pb
from tests.conftest import CLOUD_NAME, SMALL_TOML, CloudPki, EdgeTokens, make_config
from tests.raw_client import RawClient, begin, expect_status, good_step_frames, run_good_step

_TIMEOUT = 30.0
_UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
_DENIED = grpc.StatusCode.PERMISSION_DENIED


def _tls(ca: Path, cert: Path | None = None, key: Path | None = None) -> grpc.ChannelCredentials:
    def read(path: Path | None) -> bytes | None:
        return path.read_bytes() if path is not None else None

    return grpc.ssl_channel_credentials(read(ca), read(key), read(cert))


def _agreed_with(config, section: str, key: str, value: object) -> str:
    """The configuration text an edge sends in Open, with one value changed."""
    agreed = config.agreed()
    agreed[section][key] = value
    return json.dumps(agreed)


def _calls(client: RawClient, session: str) -> dict[str, object]:
    """One call of every method on ``session``, each a thunk."""
    return {
        "Open": client.open,
        "Step": lambda: client.step(good_step_frames(client, session)),
        "Evaluate": lambda: client.evaluate([pb.EvalFrame(session=session, batch=0, activation=client.activation())]),
        "Weights": lambda: client.weights(session),
        "Close": lambda: client.close_session(session),
    }


# -- TLS and mutual TLS ------------------------------------------------------------------------


def test_tls_serves_an_edge_that_trusts_its_ca_and_no_other(cloud_server, cloud_pki: CloudPki) -> None:
    config = make_config()
    address, _ = cloud_server(config, credentials=cloud_pki.server_credentials())
    good = RawClient(address, config, credentials=_tls(cloud_pki.ca), server_name=CLOUD_NAME)
    stranger = RawClient(address, config, credentials=_tls(cloud_pki.stranger_ca), server_name=CLOUD_NAME)
    clear = RawClient(address, config)
    try:
        run_good_step(good, good.open())
        # A CA that did not sign the cloud's certificate, and clear text, never get a call through.
        expect_status(stranger.open, grpc.StatusCode.UNAVAILABLE)
        expect_status(clear.open, grpc.StatusCode.UNAVAILABLE)
    finally:
        for client in (good, stranger, clear):
            client.close()


def test_mutual_tls_wants_a_client_certificate_its_ca_signed(
    cloud_server, cloud_pki: CloudPki, edge_tokens: EdgeTokens
) -> None:
    config = make_config()
    address, _ = cloud_server(config, credentials=cloud_pki.server_credentials(mutual=True), edges=edge_tokens.registry)
    pki = cloud_pki

    def client(cert: Path | None, key: Path | None, token: str | None = None) -> RawClient:
        return RawClient(address, config, credentials=_tls(pki.ca, cert, key), server_name=CLOUD_NAME, token=token)

    camera = client(pki.edge_cert, pki.edge_key)
    anonymous = client(None, None)
    forged = client(pki.stranger_cert, pki.stranger_key)
    alice = client(pki.edge_cert, pki.edge_key, token=edge_tokens.tokens["alice"])
    try:
        # The certificate alone names the edge (camera-2 in the edges file).
        session = camera.open()
        run_good_step(camera, session)
        # No certificate, or one from another CA with the same name: the handshake fails.
        expect_status(anonymous.open, grpc.StatusCode.UNAVAILABLE)
        expect_status(forged.open, grpc.StatusCode.UNAVAILABLE)
        # A token that names another edge than the certificate is refused outright.
        assert expect_status(alice.open, _UNAUTHENTICATED)
    finally:
        for each in (camera, anonymous, forged, alice):
            each.close()


def test_an_edge_trains_over_tls_with_its_token_bit_identical_to_local(
    cloud_server, cloud_pki: CloudPki, edge_tokens: EdgeTokens, tmp_path: Path
) -> None:
    config = make_config()
    address, _ = cloud_server(config, credentials=cloud_pki.server_credentials(), edges=edge_tokens.registry)
    security = LinkSecurity(ca=cloud_pki.ca, server_name=CLOUD_NAME, token=edge_tokens.tokens["bob"])
    summary = train(config, run_dir=tmp_path / "tls", cloud=address, max_steps=3, security=security)
    train(config, run_dir=tmp_path / "local", max_steps=3)
    assert summary["steps"] == 3
    split = torch.load(tmp_path / "tls" / "model.pt", weights_only=True)
    local = torch.load(tmp_path / "local" / "model.pt", weights_only=True)
    assert split.keys() == local.keys() and all(torch.equal(split[k], local[k]) for k in local)


def test_clear_text_on_a_network_address_needs_insecure(tmp_path: Path, capsys) -> None:
    config = make_config()
    with pytest.raises(TrustError, match="--tls-cert"):
        serve(config, "0.0.0.0:0")
    path = tmp_path / "cloud.toml"
    path.write_text(SMALL_TOML.format(edge_head=1))
    assert cloud_main(["--config", str(path), "--listen", "0.0.0.0:0"]) == 2
    err = capsys.readouterr().err
    assert "--insecure" in err and "--tls-cert" in err and len(err.strip().splitlines()) == 1


# -- tokens and sessions -------------------------------------------------------------------------


def test_no_token_or_a_wrong_one_is_unauthenticated_and_learns_nothing(cloud_server, edge_tokens: EdgeTokens) -> None:
    config = make_config()
    address, servicer = cloud_server(config, edges=edge_tokens.registry)
    alice = RawClient(address, config, token=edge_tokens.tokens["alice"])
    session = alice.open()
    run_good_step(alice, session)
    outsiders = [RawClient(address, config), RawClient(address, config, token="not-a-token-of-any-edge")]
    try:
        details = set()
        for outsider in outsiders:
            for name, call in _calls(outsider, session).items():
                details.add(expect_status(call, _UNAUTHENTICATED))
        # One fixed sentence whatever was asked: no session id, no step, no configuration.
        assert len(details) == 1
        (text,) = details
        assert session not in text and "step" not in text and "partition" not in text
        assert len(servicer.sessions) == 1
        run_good_step(alice, session, step=1)
    finally:
        for client in (alice, *outsiders):
            client.close()


def test_the_session_hijack_fails_at_every_step(cloud_server, edge_tokens: EdgeTokens) -> None:
    config = make_config()
    address, servicer = cloud_server(config, edges=edge_tokens.registry)
    victim = RawClient(address, config, token=edge_tokens.tokens["alice"])
    session = victim.open()
    run_good_step(victim, session)
    before = victim.weights(session)
    outsider = RawClient(address, config)
    mallory = RawClient(address, config, token=edge_tokens.tokens["mallory"])
    try:
        # 1. Learning the configuration from Open's refusal: an outsider is told nothing ...
        wrong = outsider.open_request()
        wrong.fingerprint = "0" * 16
        wrong.config_json = _agreed_with(config, "partition", "edge_head", 3)
        details = expect_status(lambda: outsider.stub.Open(wrong, timeout=_TIMEOUT), _UNAUTHENTICATED)
        assert "edge_head" not in details and "partition" not in details
        # ... and a registered edge is told what differs.
        named = expect_status(lambda: mallory.stub.Open(wrong, timeout=_TIMEOUT, metadata=mallory.metadata),
                              grpc.StatusCode.FAILED_PRECONDITION)
        assert "partition.edge_head: edge 3, cloud 1" in named
        # 2. Opening sessions without a token.
        expect_status(outsider.open, _UNAUTHENTICATED)
        assert len(servicer.sessions) == 1
        # 3. Another edge with the victim's session id: weights, evaluation, steps, close.
        for name, call in _calls(mallory, session).items():
            if name != "Open":
                details = expect_status(call, _DENIED)
                assert session not in details and "step" not in details, name
        # The victim's session is whole and at the step it was.
        assert victim.weights(session) == before
        run_good_step(victim, session, step=1)
    finally:
        for client in (victim, outsider, mallory):
            client.close()


def test_a_session_answers_only_its_owner_even_for_a_good_frame(cloud_server, edge_tokens: EdgeTokens) -> None:
    config = make_config()
    address, _ = cloud_server(config, edges=edge_tokens.registry)
    alice = RawClient(address, config, token=edge_tokens.tokens["alice"])
    bob = RawClient(address, config, token=edge_tokens.tokens["bob"])
    try:
        mine, theirs = alice.open(), bob.open()
        # A stream that starts on its own session and then names another is refused as a bad frame.
        frames = [begin(mine), pb.StepFrame(session=theirs, step=0, micro_batch=0, activation=alice.activation())]
        expect_status(lambda: alice.step(frames), grpc.StatusCode.INVALID_ARGUMENT)
        run_good_step(bob, theirs)
        run_good_step(alice, mine)
    finally:
        alice.close()
        bob.close()


# -- health, short errors, malformed messages ----------------------------------------------------


def test_health_answers_without_a_token_and_offers_no_watch(cloud_server, edge_tokens: EdgeTokens) -> None:
    address, _ = cloud_server(make_config(), edges=edge_tokens.registry)
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "edgepipe.v1.Cloud"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=_TIMEOUT)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as info:
            next(stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=_TIMEOUT))
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_error_details_stay_short_whatever_the_client_sent(cloud) -> None:
    config = make_config()
    client = RawClient(cloud(config), config)
    try:
        session = client.open()
        huge = "x" * (20 << 10)
        details = expect_status(lambda: client.weights(huge), grpc.StatusCode.NOT_FOUND)
        assert len(details) <= DETAIL_CHARS and huge[:30] in details
        bad = client.activation()
        bad.codec = "c" * (20 << 10)
        frame = pb.StepFrame(session=session, step=0, micro_batch=0, activation=bad)
        details = expect_status(lambda: client.step([begin(session), frame]), grpc.StatusCode.INVALID_ARGUMENT)
        assert len(details) <= DETAIL_CHARS and "codec" in details
    finally:
        client.close()


@pytest.mark.parametrize(
    ("text", "words"),
    [
        # Nested far past Python's recursion limit, yet under the 64 KiB the cloud reads.
        ('{"a":' * 10_000 + "1" + "}" * 10_000, "not a readable configuration"),
        ("[" * 30_000 + "]" * 30_000, "not a readable configuration"),
        ('{"model": {"name": "' + "n" * 70_000 + '"}}', "more than the cloud reads"),
        ("not json at all", "not a readable configuration"),
        (_agreed_with(make_config(), "partition", "edge_head", {"k" * 500: [[[[[[[[[[1]]]]]]]]]]}), "partition.edge_head"),
    ],
    ids=["deep-objects", "deep-arrays", "too-long", "not-json", "odd-values"],
)
def test_hostile_configuration_text_in_open_is_a_short_failed_precondition(cloud, text: str, words: str) -> None:
    config = make_config()
    client = RawClient(cloud(config), config)
    try:
        request = client.open_request()
        request.fingerprint = "f" * 16
        request.config_json = text
        details = expect_status(lambda: client.stub.Open(request, timeout=_TIMEOUT), grpc.StatusCode.FAILED_PRECONDITION)
        assert len(details) <= DETAIL_CHARS
        assert details.startswith("edge and cloud run different configurations") and words in details
    finally:
        client.close()


def test_a_malformed_message_is_invalid_argument_and_one_log_line(cloud, caplog) -> None:
    config = make_config()
    address = cloud(config)
    caplog.set_level(logging.INFO)
    garbage = b"\xff\xff\xff\xff\x0f"   # a field number 0 with a truncated varint: no message parses it
    with grpc.insecure_channel(address) as channel:
        def raw(kind: str, name: str):
            return getattr(channel, kind)(f"/edgepipe.v1.Cloud/{name}", request_serializer=None,
                                          response_deserializer=None)

        calls = [
            lambda: raw("unary_unary", "Open")(garbage, timeout=_TIMEOUT),
            lambda: raw("unary_unary", "Close")(garbage, timeout=_TIMEOUT),
            lambda: list(raw("unary_stream", "Weights")(garbage, timeout=_TIMEOUT)),
            lambda: list(raw("stream_stream", "Step")(iter([garbage]), timeout=_TIMEOUT)),
            lambda: list(raw("stream_stream", "Evaluate")(iter([garbage]), timeout=_TIMEOUT)),
        ]
        for _ in range(10):
            for call in calls:
                details = expect_status(call, grpc.StatusCode.INVALID_ARGUMENT)
                assert details.startswith("malformed ") and details.endswith(" bytes)")
    malformed = [r for r in caplog.records if "malformed" in r.getMessage()]
    assert 1 <= len(malformed) <= 5, [r.getMessage() for r in malformed]
    assert not any(r.exc_info for r in caplog.records), "a traceback was logged"
    assert not any("deserializ" in r.getMessage() for r in caplog.records)


def test_tls_flags_that_cannot_work_exit_2_in_one_line(tmp_path: Path, cloud_pki: CloudPki, capsys) -> None:
    path = tmp_path / "cloud.toml"
    path.write_text(SMALL_TOML.format(edge_head=1))
    base = ["--config", str(path), "--listen", "127.0.0.1:0"]
    with pytest.raises(SystemExit) as info:
        cloud_main([*base, "--tls-cert", str(cloud_pki.cloud_cert)])
    assert info.value.code == 2 and "--tls-key" in capsys.readouterr().err
    # A key that is not the certificate's: refused before anything listens.
    assert cloud_main([*base, "--tls-cert", str(cloud_pki.cloud_cert), "--tls-key", str(cloud_pki.edge_key)]) == 2
    out, err = capsys.readouterr()
    assert "listening" not in out and "does not belong to the certificate" in err
