"""The committed generated protobuf modules are what scripts/gen_protos.py makes from edgepipe.proto."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ("edgepipe_pb2.py", "edgepipe_pb2_grpc.py")


def _gen_protos() -> ModuleType:
    path = ROOT / "scripts" / "gen_protos.py"
    spec = importlib.util.spec_from_file_location("edgepipe_gen_protos", path)
    assert spec is not None and spec.loader is not None, f"cannot import {path}"
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # grpcio-tools comes with the dev extra, like pytest itself: no skip when it is missing.
    out = tmp_path_factory.mktemp("protos-out")
    _gen_protos().generate(out)
    return out / "protos"


@pytest.mark.parametrize("name", GENERATED)
def test_committed_module_is_current(regenerated: Path, name: str) -> None:
    fresh = regenerated / name
    committed = ROOT / "protos" / name
    assert fresh.is_file(), f"scripts/gen_protos.py did not write {name}"
    assert fresh.read_bytes() == committed.read_bytes(), (
        f"protos/{name} is out of date with protos/edgepipe.proto (or was made by another grpcio-tools): "
        "run `python scripts/gen_protos.py` and commit the result"
    )


def test_grpc_module_imports_the_package_path(regenerated: Path) -> None:
    # The generated stub must import the message module as installed, not as a top-level module.
    text = (regenerated / "edgepipe_pb2_grpc.py").read_text()
    assert "from protos import edgepipe_pb2" in text


def test_generated_service_has_every_call() -> None:
    from protos import edgepipe_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["Cloud"]
    assert pb.DESCRIPTOR.package == "edgepipe.v1"
    assert {m.name for m in service.methods} == {"Open", "Step", "Evaluate", "Weights", "Close", "Sync"}
    step = service.methods_by_name["Step"]
    assert step.client_streaming and step.server_streaming
