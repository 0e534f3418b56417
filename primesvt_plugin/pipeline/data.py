"""Datasets as in-memory train/val/test splits of images ``[N, C, H, W]`` and labels."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from ..errors import DataError


@dataclass(frozen=True)
class DataSplits:
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

    def loader(self, split: str, batch_size: int, shuffle: bool = False, seed: int = 0,
               limit: int | None = None) -> DataLoader:
        x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
        if limit is not None:
            x, y = x[:limit], y[:limit]
        dataset = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle,
                          generator=torch.Generator().manual_seed(seed))


def split_arrays(x: np.ndarray, y: np.ndarray, val_fraction: float, test_fraction: float,
                 seed: int) -> DataSplits:
    """Shuffle once with ``seed`` and cut into train / val / test."""
    if x.ndim != 4:
        raise DataError(f"images must be [N, C, H, W], got shape {x.shape}")
    if len(x) != len(y):
        raise DataError(f"{len(x)} images but {len(y)} labels")
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


def digits_splits(image_size: int | None = 16, val_fraction: float = 0.15, test_fraction: float = 0.2,
                  seed: int = 0) -> DataSplits:
    """scikit-learn's 8x8 handwritten digits (1797 images, shipped with the package), scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    return split_arrays(resize(x, image_size), digits.target, val_fraction, test_fraction, seed)


def npz_splits(path: str | Path, image_size: int | None = None, val_fraction: float = 0.15,
               test_fraction: float = 0.2, seed: int = 0) -> DataSplits:
    """Arrays ``x`` ([N, C, H, W] or [N, H, W]) and ``y`` (labels) from a ``.npz`` file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    try:
        with np.load(path) as arrays:
            x, y = arrays["x"], arrays["y"]
    except KeyError as missing:
        raise DataError(f"{path} must hold arrays 'x' and 'y' (missing {missing})") from None
    except (ValueError, OSError) as error:
        raise DataError(f"{path} is not a readable .npz file: {error}") from None
    if x.ndim == 3:
        x = x[:, None]
    return split_arrays(resize(x.astype(np.float32), image_size), y, val_fraction, test_fraction, seed)


def image_folder_splits(root: str | Path, image_size: int = 32, grayscale: bool = False,
                        val_fraction: float = 0.15, test_fraction: float = 0.2, seed: int = 0) -> DataSplits:
    """``root/<class name>/<image>`` files (any format Pillow reads); classes sorted by name."""
    from PIL import Image

    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not classes:
        raise DataError(f"image folder {root} has no class sub-folders")
    images, labels = [], []
    for label, name in enumerate(classes):
        for file in sorted((root / name).iterdir()):
            with Image.open(file) as image:
                image = image.convert("L" if grayscale else "RGB").resize((image_size, image_size))
                array = np.asarray(image, dtype=np.float32) / 255.0
            images.append(array[None] if grayscale else array.transpose(2, 0, 1))
            labels.append(label)
    return split_arrays(np.stack(images), np.array(labels), val_fraction, test_fraction, seed)
