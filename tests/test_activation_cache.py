"""[link] cache_frozen: after the head freezes, the cloud keeps each sample's activation and the
uplink carries indices; the result stays bit-identical to the run without the cache."""
from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
import torch

from cloud_node.activation_cache import ActivationCache
from edge_node.worker import train
from pipeline.checkpoint import load_state
from pipeline.config import ConfigError
from pipeline.data import load_dataset
from protos import edgepipe_pb2 as pb
from tests.conftest import make_config
from tests.raw_client import RawClient, begin, expect_status

FREEZE_STEP = 2


def _config(cache: bool, **link):
    return make_config(
        partition={"edge_head": 1, "edge_tail": 1, "chunks": 4},
        skip={"policy": "manual", "stop_layers": [0], "stop_steps": [FREEZE_STEP]},
        train={"dataset": "synthetic", "batch_size": 32, "epochs": 3, "lr": 0.05},
        link={"cache_frozen": cache, **link},
    )


def _steps(run_dir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if "step" in line]


def test_a_cached_run_equals_the_run_without_the_cache_and_its_uplink_empties(cloud, tmp_path: Path) -> None:
    cached_config, plain_config = _config(True), _config(False)
    train(cached_config, run_dir=tmp_path / "cached", cloud=cloud(cached_config))
    train(plain_config, run_dir=tmp_path / "plain", cloud=cloud(plain_config))
    train(plain_config, run_dir=tmp_path / "local")

    cached, plain, local = (load_state(tmp_path / name / "model.pt") for name in ("cached", "plain", "local"))
    assert all(torch.equal(cached[k], plain[k]) and torch.equal(cached[k], local[k]) for k in plain)

    def uplink_activations(run: str, epoch: int) -> int:
        return sum(line["by_kind"]["activation"]["uplink_bytes"] for line in _steps(tmp_path / run) if line["epoch"] == epoch)

    # Epoch 0 fills the cache after the freeze; by the last epoch every sample is on the cloud.
    for epoch in (1, 2):
        assert uplink_activations("cached", epoch) < uplink_activations("plain", epoch)
    assert uplink_activations("cached", 2) < uplink_activations("plain", 2) / 8
    # Before the freeze nothing is cached: the first steps are the same bytes.
    assert [line["uplink_bytes"] for line in _steps(tmp_path / "cached")[:FREEZE_STEP]] == [
        line["uplink_bytes"] for line in _steps(tmp_path / "plain")[:FREEZE_STEP]
    ]


def test_the_cache_spills_to_disk_past_its_bound_and_forgets_on_clear(tmp_path: Path) -> None:
    cache = ActivationCache(memory_bytes=10, spill_dir=tmp_path)
    rows = {sample: bytes([sample]) * 4 for sample in range(5)}
    for sample, row in rows.items():
        cache.put(sample, row)
    cache.put(0, b"other")  # a sample already held keeps its first row
    assert len(cache) == 5 and cache.spilled == 3
    assert all(cache.get(sample) == row for sample, row in rows.items())
    cache.clear()
    assert len(cache) == 0 and 3 not in cache
    with pytest.raises(KeyError):
        cache.get(3)


@pytest.mark.parametrize(
    ("link", "skip", "federation", "words"),
    [({"uplink": "int8"}, {}, {}, "scales a micro-batch as a whole"),
     ({}, {"prefix": "local"}, {}, "needs skip.prefix"),
     ({}, {}, {"mode": "splitfed-v1", "edges": 2}, "split-federated")],
)
def test_a_cache_that_would_change_the_results_is_refused(link: dict, skip: dict, federation: dict, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        make_config(link={"cache_frozen": True, **link}, skip=skip, federation=federation)


def test_data_that_declares_augmentation_is_refused(tmp_path: Path) -> None:
    config = _config(True)
    train_set, val_set = load_dataset("synthetic", input_shape=(1, 8, 8), num_classes=10, val_fraction=0.2, seed=0)

    class Augmented(torch.utils.data.Dataset):
        augmented = True

        def __len__(self) -> int:
            return len(train_set)

        def __getitem__(self, i: int):
            return train_set.inputs[i], int(train_set.labels[i])

    with pytest.raises(ConfigError, match="augmented"):
        train(config, run_dir=tmp_path / "run", data=(Augmented(), val_set))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize(("samples", "words"), [(list(range(8)), "sample 0"), ([], "1 to 8 samples")])
def test_a_cached_frame_naming_samples_the_cloud_lacks_is_invalid(cloud, samples: list[int], words: str) -> None:
    # A frozen head from the start: the cloud caches, and holds nothing yet.
    config = make_config(link={"cache_frozen": True}, skip={"policy": "manual", "stop_layers": [0], "stop_steps": [0]})
    client = RawClient(cloud(config), config)
    session = client.open()
    frames = [begin(session, step=0), pb.StepFrame(session=session, step=0, micro_batch=0, cached=pb.Cached(),
                                                   samples=samples)]
    frames[0].begin.boundary = 1
    details = expect_status(lambda: client.step(frames), grpc.StatusCode.INVALID_ARGUMENT)
    assert words in details, details
    client.close()
