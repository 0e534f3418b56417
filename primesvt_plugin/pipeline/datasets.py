"""Datasets for recipes: train / val / test splits as torch Datasets, streamed by DataLoaders.

A dataset plugin returns ``Datasets`` (any torch ``Dataset`` of ``(image, label)``
pairs per split: files are read as batches are drawn) or, for data that fits in
memory, ``DataSplits`` (numpy arrays), which the runner turns into ``Datasets``.
The readers of the formats recipes name (digits, .npz, CIFAR, image trees, DVS
frames) are in ``readers.py``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from ..errors import DataError

SPLITS = ("train", "val", "test")


class Augmented(Dataset):
    """``dataset`` with ``augment(image) -> image`` applied to every sample as it is read."""

    def __init__(self, dataset: Dataset, augment: Callable[[torch.Tensor], torch.Tensor]):
        self.dataset, self.augment = dataset, augment

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        image, label = self.dataset[index]
        return self.augment(image), label


def _time_major(batch):
    """Collate ``[T, ...]`` samples into ``[T, N, ...]`` (what multi-step SpikingJelly models take)."""
    images, labels = torch.utils.data.default_collate(batch)
    return images.transpose(0, 1), labels


@dataclass
class Datasets:
    """A dataset's splits: torch Datasets of ``(image tensor, int label)``.

    ``augment`` (per image) is applied to the training split when a loader asks for it
    (training and fine-tuning), never to evaluation. ``time_major``: samples are
    ``[T, C, H, W]`` (event frames) and batches ``[T, N, C, H, W]``.
    """

    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None
    time_major: bool = False
    workers: int = 0  # DataLoader worker processes (recipe ``data.workers``)

    def split(self, name: str) -> Dataset:
        if name not in SPLITS:
            raise DataError(f"unknown split {name!r}; one of {', '.join(SPLITS)}")
        return getattr(self, name)

    def loader(self, split: str, batch_size: int, shuffle: bool = False, seed: int = 0, limit: int | None = None,
               augment: bool | None = None) -> DataLoader:
        """Batches of ``split`` (the first ``limit`` samples).

        ``augment`` defaults to "a shuffled training loader": training and fine-tuning
        see augmented images, evaluation never does.
        """
        dataset = self.split(split)
        if limit is not None and limit < len(dataset):
            dataset = Subset(dataset, range(limit))
        if augment is None:
            augment = split == "train" and shuffle
        if augment and self.augment is not None:
            dataset = Augmented(dataset, self.augment)
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=self.workers,
                          generator=torch.Generator().manual_seed(seed),
                          collate_fn=_time_major if self.time_major else None)

    def images(self, split: str, count: int) -> np.ndarray:
        """The first ``count`` images of ``split`` as one float32 batch (for calibration and export checks)."""
        dataset = self.split(split)
        batch = torch.stack([dataset[i][0] for i in range(min(count, len(dataset)))])
        return (batch.transpose(0, 1) if self.time_major else batch).numpy().astype(np.float32)

    def labels(self, split: str) -> np.ndarray:
        """Every label of ``split``: the dataset's ``targets`` when it has them, else read sample by sample."""
        dataset = self.split(split)
        targets = getattr(dataset, "targets", None)
        if targets is None:
            targets = [int(dataset[i][1]) for i in range(len(dataset))]
        return np.asarray(targets, dtype=np.int64)

    def example(self) -> torch.Tensor:
        """A batch of one validation sample: what the model is probed and traced with."""
        return torch.from_numpy(self.images("val", 1))


class LabelledTensors(TensorDataset):
    """A TensorDataset of images and labels that exposes ``targets`` (labels without reading images)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        super().__init__(images, labels)
        self.targets = labels


@dataclass(frozen=True)
class DataSplits:
    """A dataset that fits in memory: train / val / test arrays ``[N, C, H, W]`` and labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])

    def map_images(self, fn: Callable[[np.ndarray], np.ndarray]) -> "DataSplits":
        return replace(self, x_train=fn(self.x_train), x_val=fn(self.x_val), x_test=fn(self.x_test))

    def datasets(self, augment: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Datasets:
        """The same splits as torch Datasets."""
        def split(x, y):
            return LabelledTensors(torch.from_numpy(x), torch.from_numpy(y))

        return Datasets(split(self.x_train, self.y_train), split(self.x_val, self.y_val),
                        split(self.x_test, self.y_test), self.num_classes, augment)

    def loader(self, split: str, batch_size: int, shuffle: bool = False, seed: int = 0,
               limit: int | None = None) -> DataLoader:
        return self.datasets().loader(split, batch_size, shuffle, seed, limit)


def as_datasets(data, where: str = "dataset") -> Datasets:
    """``Datasets`` from what a dataset plugin returned (``Datasets`` or ``DataSplits``)."""
    if isinstance(data, Datasets):
        return data
    if isinstance(data, DataSplits):
        return data.datasets()
    raise DataError(f"{where} returned {type(data).__name__}; a dataset must return primesvt_plugin.Datasets "
                    "(torch Datasets per split) or primesvt_plugin.DataSplits (arrays)")


def split_arrays(x: np.ndarray, y: np.ndarray, val_fraction: float, test_fraction: float,
                 seed: int) -> DataSplits:
    """Shuffle once with ``seed`` and cut into train / val / test."""
    if x.ndim != 4:
        raise DataError(f"images must be [N, C, H, W], got shape {x.shape}")
    if y.ndim != 1 or len(x) != len(y):
        raise DataError(f"{len(x)} images but labels of shape {list(y.shape)}: one label per image")
    if not np.issubdtype(y.dtype, np.number) or (y != np.round(y)).any() or (y < 0).any():
        raise DataError(f"labels must be whole numbers 0..classes-1, got {y.dtype} labels from {y.min()} to {y.max()}")
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order].astype(np.float32), y[order].astype(np.int64)
    n_test, n_val = int(round(len(x) * test_fraction)), int(round(len(x) * val_fraction))
    if len(x) - n_test - n_val < 1 or n_val < 1 or n_test < 1:
        raise DataError(f"{len(x)} samples are too few for val_fraction={val_fraction}, "
                        f"test_fraction={test_fraction}")
    test, val, train = slice(0, n_test), slice(n_test, n_test + n_val), slice(n_test + n_val, None)
    return DataSplits(x[train], y[train], x[val], y[val], x[test], y[test], int(y.max()) + 1)


def resize(x: np.ndarray, image_size: int | None) -> np.ndarray:
    if image_size is None or x.shape[-1] == image_size:
        return x
    resized = F.interpolate(torch.from_numpy(x), size=(image_size, image_size), mode="bilinear", align_corners=False)
    return resized.numpy()
