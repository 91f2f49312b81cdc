"""Datasets that live on the edge: digits (shipped with scikit-learn), CIFAR-10 binary files, synthetic."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.data

__all__ = [
    "DataError", "Dataset", "Shard", "as_dataset", "load_dataset", "mini_batches", "parse_shard", "shard",
    "training_batches",
]

_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR_STD = (0.2470, 0.2435, 0.2616)
_CIFAR_RECORD = 1 + 3 * 32 * 32
_CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
_CIFAR_TEST_FILE = "test_batch.bin"


class DataError(ValueError):
    """A dataset cannot be loaded; the message says what is missing or wrong."""


@dataclass(frozen=True)
class Shard:
    """Part ``index`` (1-based) of ``count`` equal parts of a training set."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 1 <= self.index <= self.count:
            raise DataError(f"shard {self.index}/{self.count}: K/N needs 1 <= K <= N")

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


@dataclass(frozen=True)
class Dataset:
    """Images ``[N, C, H, W]`` (float32) and their labels ``[N]`` (int64).

    ``augmented``: the data says its images are randomly augmented (a user dataset with an
    ``augmented = True`` attribute), so a sample is not the same image every time it is seen and
    ``[link] cache_frozen`` is refused for it. Datasets are read once into memory, so edgepipe
    itself never augments.
    """

    inputs: torch.Tensor
    labels: torch.Tensor
    augmented: bool = False

    def __len__(self) -> int:
        return len(self.labels)


def as_dataset(data: Any, *, input_shape: tuple[int, int, int], num_classes: int, what: str = "dataset") -> Dataset:
    """A :class:`Dataset` from user data: a Dataset, an ``(inputs, labels)`` pair of tensors, or
    a ``torch.utils.data.Dataset`` of ``(image, label)`` items (read once, in index order).

    Images must have ``input_shape`` and labels lie in ``[0, num_classes)``; ``what`` names the
    data in errors.
    """
    if isinstance(data, Dataset):
        inputs, labels = data.inputs, data.labels
    elif isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        inputs, labels = data
    elif isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__len__"):
        items = [data[i] for i in range(len(data))]  # type: ignore[arg-type]
        if not items:
            raise DataError(f"{what} is empty")
        inputs = torch.stack([torch.as_tensor(x) for x, _ in items])
        labels = torch.as_tensor([int(y) for _, y in items])
    else:
        raise DataError(
            f"{what}: expected a torch Dataset of (image, label), an (inputs, labels) pair of tensors "
            f"or a pipeline.data.Dataset, got {type(data).__name__}"
        )
    if tuple(inputs.shape[1:]) != tuple(input_shape) or len(inputs) != len(labels) or labels.ndim != 1:
        raise DataError(
            f"{what}: images of shape {list(inputs.shape)} with {len(labels)} labels; expected "
            f"[N, {', '.join(map(str, input_shape))}] images (model.input_shape) and N labels"
        )
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise DataError(f"{what}: labels must lie in [0, {num_classes}) (model.num_classes)")
    return Dataset(inputs.float().contiguous(), labels.long().contiguous(), bool(getattr(data, "augmented", False)))


def _fit_shape(images: torch.Tensor, input_shape: tuple[int, int, int]) -> torch.Tensor:
    channels, height, width = input_shape
    if images.shape[-2:] != (height, width):
        images = F.interpolate(images, size=(height, width), mode="bilinear", align_corners=False)
    if images.shape[1] != channels:
        if images.shape[1] != 1:
            raise DataError(
                f"dataset images have {images.shape[1]} channels but model.input_shape asks for {channels}"
            )
        images = images.expand(-1, channels, -1, -1)
    return images.contiguous()


def _split(inputs: torch.Tensor, labels: torch.Tensor, val_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(len(labels) * val_fraction))
    val, train = order[:n_val], order[n_val:]
    return Dataset(inputs[train], labels[train]), Dataset(inputs[val], labels[val])


def _digits(input_shape: tuple[int, int, int], val_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    images = (images - 0.5) / 0.5
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    return _split(_fit_shape(images, input_shape), labels, val_fraction, seed)


def _synthetic(
    input_shape: tuple[int, int, int], num_classes: int, val_fraction: float, seed: int, size: int = 512
) -> tuple[Dataset, Dataset]:
    # Class prototypes plus noise: learnable, deterministic, and no files needed.
    rng = torch.Generator().manual_seed(seed)
    prototypes = torch.randn((num_classes, *input_shape), generator=rng)
    labels = torch.randint(0, num_classes, (size,), generator=rng)
    inputs = prototypes[labels] + 0.5 * torch.randn((size, *input_shape), generator=rng)
    return _split(inputs, labels, val_fraction, seed)


def _read_cifar(files: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    raw = []
    for path in files:
        blob = np.fromfile(path, dtype=np.uint8)
        if blob.size == 0 or blob.size % _CIFAR_RECORD:
            raise DataError(f"{path} is not a CIFAR-10 binary batch ({blob.size} bytes is not a multiple of {_CIFAR_RECORD})")
        raw.append(blob.reshape(-1, _CIFAR_RECORD))
    records = np.concatenate(raw)
    labels = torch.from_numpy(records[:, 0].astype(np.int64))
    images = torch.from_numpy(records[:, 1:].astype(np.float32) / 255.0).view(-1, 3, 32, 32)
    mean = torch.tensor(_CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(_CIFAR_STD).view(1, 3, 1, 1)
    return (images - mean) / std, labels


def _cifar10(directory: Path, input_shape: tuple[int, int, int]) -> tuple[Dataset, Dataset]:
    if not directory.is_dir():
        raise DataError(
            f"{directory} is not a directory: train.dataset 'cifar10:DIR' names where the CIFAR-10 "
            "binary version is unpacked"
        )
    # All six or nothing: a partly unpacked archive would otherwise train on part of the data.
    missing = [name for name in (*_CIFAR_TRAIN_FILES, _CIFAR_TEST_FILE) if not (directory / name).is_file()]
    if missing:
        raise DataError(
            f"{directory} lacks the CIFAR-10 binary file(s) {', '.join(missing)}: unpack all of "
            "cifar-10-binary.tar.gz there (data_batch_1.bin ... data_batch_5.bin, test_batch.bin; "
            "the pickled python version is not read)"
        )
    train_x, train_y = _read_cifar([directory / name for name in _CIFAR_TRAIN_FILES])
    test_x, test_y = _read_cifar([directory / _CIFAR_TEST_FILE])
    return Dataset(_fit_shape(train_x, input_shape), train_y), Dataset(_fit_shape(test_x, input_shape), test_y)


def load_dataset(
    spec: str, *, input_shape: tuple[int, int, int], num_classes: int, val_fraction: float, seed: int
) -> tuple[Dataset, Dataset]:
    """Training and held-out data for ``train.dataset``, shaped to ``model.input_shape``."""
    if spec == "digits":
        train, val = _digits(input_shape, val_fraction, seed)
        needed = 10
    elif spec == "synthetic":
        train, val = _synthetic(input_shape, num_classes, val_fraction, seed)
        needed = num_classes
    elif spec.startswith("cifar10:"):
        train, val = _cifar10(Path(spec.removeprefix("cifar10:")).expanduser(), input_shape)
        needed = 10
    else:
        raise DataError(f'unknown dataset {spec!r}: use "digits", "synthetic" or "cifar10:DIR"')
    if num_classes < needed:
        raise DataError(f"dataset {spec!r} has {needed} classes but model.num_classes is {num_classes}")
    return train, val


def mini_batches(
    data: Dataset, batch_size: int, *, shuffle_seed: int | None, drop_last: bool
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches in a deterministic order (``shuffle_seed`` None keeps the stored order)."""
    for index in batch_indices(len(data), batch_size, shuffle_seed=shuffle_seed, drop_last=drop_last):
        yield data.inputs[index], data.labels[index]


def batch_indices(n: int, batch_size: int, *, shuffle_seed: int | None, drop_last: bool) -> Iterator[torch.Tensor]:
    """The sample indices of each of :func:`mini_batches`' batches over ``n`` samples."""
    if shuffle_seed is None:
        order = torch.arange(n)
    else:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(shuffle_seed))
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        yield order[start : start + batch_size]


def training_batches(data: Dataset, batch_size: int, *, seed: int, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The mini-batches of one training epoch: reshuffled per epoch, the incomplete last one dropped.

    Every run of the same configuration (split, ``--local``, or a reference) sees this order.
    """
    return mini_batches(data, batch_size, shuffle_seed=_epoch_seed(seed, epoch), drop_last=True)


def training_indices(data: Dataset, batch_size: int, *, seed: int, epoch: int) -> Iterator[torch.Tensor]:
    """The sample indices of :func:`training_batches`' batches, in the same order."""
    return batch_indices(len(data), batch_size, shuffle_seed=_epoch_seed(seed, epoch), drop_last=True)


def _epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1000 + epoch


def parse_shard(text: str) -> Shard:
    """``"K/N"`` (part K of N, 1-based) as a :class:`Shard`."""
    index, sep, count = text.partition("/")
    if not (sep and index.strip().isdigit() and count.strip().isdigit()):
        raise DataError(f"shard {text!r}: write it as K/N, e.g. 2/3 for the second of three parts")
    return Shard(int(index), int(count))


#: Mixed into the shard permutation's seed, so that shards do not follow the batch order's draws.
_SHARD_SEED = 7919


def shard(data: Dataset, part: Shard, *, seed: int) -> Dataset:
    """Part ``part`` of ``data``: a seeded permutation cut into ``part.count`` parts of equal size.

    Every edge of a federation computes the same permutation, so the parts are disjoint and
    together cover the data but for the fewer than ``count`` samples left over; equal sizes
    give every edge the same number of steps per epoch.
    """
    size = len(data) // part.count
    if size == 0:
        raise DataError(f"shard {part}: the training set has {len(data)} samples, fewer than {part.count} parts")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed * 1000 + _SHARD_SEED))
    index = order[(part.index - 1) * size : part.index * size].sort().values
    return Dataset(data.inputs[index], data.labels[index], data.augmented)
