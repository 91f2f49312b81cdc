"""pipeline.data: the CIFAR-10 binary version is read whole, or refused naming what is missing."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.data import DataError, load_dataset

_RECORD = 1 + 3 * 32 * 32
_ALL = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]


def _write_batches(directory: Path, names: list[str], records: int = 2) -> None:
    # The binary format: per image one label byte, then 3072 pixel bytes (R, G, B planes of 32x32).
    for index, name in enumerate(names):
        blob = np.zeros((records, _RECORD), dtype=np.uint8)
        blob[:, 0] = [(index + r) % 10 for r in range(records)]
        blob[:, 1:] = 128
        blob.tofile(directory / name)


def _load(directory: Path):
    return load_dataset(f"cifar10:{directory}", input_shape=(3, 32, 32), num_classes=10, val_fraction=0.2, seed=0)


def test_all_six_files_are_read(tmp_path: Path) -> None:
    _write_batches(tmp_path, _ALL)
    train, test = _load(tmp_path)
    assert (len(train), len(test)) == (10, 2)
    assert train.inputs.shape == (10, 3, 32, 32)
    assert train.labels.tolist() == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5]  # in file order, batch 1 first
    assert test.labels.tolist() == [5, 6]


@pytest.mark.parametrize(
    "present, missing",
    [
        (_ALL[:3] + ["test_batch.bin"], ["data_batch_4.bin", "data_batch_5.bin"]),
        (_ALL[:5], ["test_batch.bin"]),
        ([], _ALL),
    ],
    ids=["some-training-batches", "no-test-batch", "empty"],
)
def test_a_partial_set_names_exactly_the_missing_files(tmp_path: Path, present, missing) -> None:
    _write_batches(tmp_path, present)
    with pytest.raises(DataError) as info:
        _load(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message
    named = message.split("file(s) ", 1)[1].split(":", 1)[0]
    assert named == ", ".join(missing)


def test_a_directory_that_does_not_exist_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="is not a directory"):
        _load(tmp_path / "nowhere")
