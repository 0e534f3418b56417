"""Readers of the formats recipes name (``data.name``), on disk streamed sample by sample:

- CIFAR-10 / CIFAR-100 in the official "python version" pickle layout
  (``data_batch_1..5`` + ``test_batch``; ``train`` + ``test`` for CIFAR-100);
- image trees: ``root/<class>/<image>`` (split at random), and the ImageNet layout
  ``root/train/<class>/...`` + ``root/val/<class>/...`` (the official validation set,
  regrouped into class folders as the usual ``valprep.sh`` does);
- event frames as SpikingJelly's frame conversion writes them:
  ``root/frames_number_<T>_split_by_<how>/[train|test/]<class>/<sample>.npz``
  holding ``frames`` of shape ``[T, 2, H, W]`` (CIFAR10-DVS, DVS128 Gesture).

The formats are read directly rather than through torchvision or
``spikingjelly.datasets``: on CPU-only torch builds those do not import (torchvision's
wheel is built against the CUDA torch), and one tested code path is better than two.
Training loaders get the augmentation the Spikformer papers use (random crop with
padding and horizontal flip; random resized crop and flip for ImageNet); evaluation
and calibration read the images as they are. The policy scores trials on ``val``, which never
overlaps ``test``.
"""
from __future__ import annotations

import importlib
import pickle
import random
import re
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..errors import DataError, first_line
from .datasets import DataSplits, Datasets, resize, split_arrays

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


# -- augmentation ---------------------------------------------------------------------


def crop_and_flip(padding: int = 4) -> Callable[[torch.Tensor], torch.Tensor]:
    """Random crop of the zero-padded image back to its size, then a random left-right flip."""
    def augment(image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        padded = F.pad(image, (padding, padding, padding, padding))
        top, left = (int(v) for v in torch.randint(0, 2 * padding + 1, (2,)))
        out = padded[..., top:top + height, left:left + width]
        return out.flip(-1) if torch.rand(()) < 0.5 else out
    return augment


def resized_crop_and_flip(min_area: float = 0.08) -> Callable[[torch.Tensor], torch.Tensor]:
    """Random crop of 8%-100% of the area with aspect 3/4-4/3, resized back, then a random flip
    (ImageNet training as the Spikformer recipes do it, on the evaluation-sized image)."""
    def augment(image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        for _ in range(10):
            area = height * width * random.uniform(min_area, 1.0)
            aspect = float(np.exp(random.uniform(np.log(3 / 4), np.log(4 / 3))))
            w, h = round((area * aspect) ** 0.5), round((area / aspect) ** 0.5)
            if 0 < w <= width and 0 < h <= height:
                top, left = random.randint(0, height - h), random.randint(0, width - w)
                image = F.interpolate(image[None, ..., top:top + h, left:left + w], size=(height, width),
                                      mode="bilinear", align_corners=False)[0]
                break
        return image.flip(-1) if random.random() < 0.5 else image
    return augment


# -- CIFAR ----------------------------------------------------------------------------


class ArrayImages(Dataset):
    """uint8 images ``[N, C, H, W]`` kept compact in memory, converted to float on read."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, image_size: int | None = None):
        self.images, self.targets, self.image_size = images, labels.astype(np.int64), image_size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image = torch.from_numpy(self.images[index].astype(np.float32) / 255.0)
        if self.image_size and image.shape[-1] != self.image_size:
            image = F.interpolate(image[None], size=(self.image_size, self.image_size), mode="bilinear",
                                  align_corners=False)[0]
        return image, int(self.targets[index])


def _latin1(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for bytes, limited to that use."""
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refused: bytes encoded as {encoding!r}")
    return text.encode("latin1")


def _numpy_pickle_parts() -> dict[tuple[str, str], object]:
    """The callables numpy arrays, dtypes and scalars are pickled with (numpy 1 and 2 module names)."""
    core = importlib.import_module("numpy._core" if hasattr(np, "_core") else "numpy.core")
    parts = {"multiarray._reconstruct": core.multiarray._reconstruct, "multiarray.scalar": core.multiarray.scalar,
             "numeric._frombuffer": core.numeric._frombuffer}
    allowed: dict[tuple[str, str], object] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                                               ("_codecs", "encode"): _latin1}
    for package in ("numpy.core", "numpy._core"):
        for qualified, part in parts.items():
            module, name = qualified.split(".")
            allowed[(f"{package}.{module}", name)] = part
    return allowed


class CifarUnpickler(pickle.Unpickler):
    """Reads what CIFAR's python format holds (bytes, str, int, lists, dicts, numpy arrays and dtypes) and
    refuses any other object without creating it: a pickle's other objects can run code."""

    allowed = _numpy_pickle_parts()

    def find_class(self, module: str, name: str):
        if (module, name) not in self.allowed:
            raise pickle.UnpicklingError(f"holds a {module}.{name} object, which a CIFAR batch never does "
                                         "(refused without creating it: a pickle's objects can run code)")
        return self.allowed[(module, name)]


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path} is missing: expected the CIFAR 'python version' layout "
                        "(cifar-10-batches-py/data_batch_1..5 and test_batch, or cifar-100-python/train and test)")
    try:
        with open(path, "rb") as file:
            batch = CifarUnpickler(file, encoding="bytes").load()
    except Exception as error:  # any malformed pickle: truncated, foreign, or carrying code (refused above)
        raise DataError(f"{path} is not a CIFAR batch: {first_line(error)}") from None
    if not isinstance(batch, dict):
        raise DataError(f"{path} is not a CIFAR batch: it holds a {type(batch).__name__}, not a dict")
    return batch


def _cifar_batch(path: Path, label_key: bytes, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Images ``[N, 3, 32, 32]`` and labels of one CIFAR batch file, checked against each other."""
    batch = _unpickle(path)
    missing = [repr(key) for key in (b"data", label_key) if key not in batch]
    if missing:
        raise DataError(f"{path}: the CIFAR batch lacks {' and '.join(missing)}")
    data, labels = batch[b"data"], batch[label_key]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: {b'data'!r} must be a uint8 array [N, 3072] (32x32 RGB images), got "
                        f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        raise DataError(f"{path}: {label_key!r} must be a list of integer labels") from None
    if labels.ndim != 1 or len(labels) != len(data):
        raise DataError(f"{path}: {len(data)} images but {labels.size} labels in {label_key!r}")
    out_of_range = labels[(labels < 0) | (labels >= classes)]
    if out_of_range.size:
        raise DataError(f"{path}: label {int(out_of_range[0])} in {label_key!r} is outside 0..{classes - 1} "
                        f"(CIFAR-{classes} has {classes} classes)")
    return data.reshape(-1, 3, 32, 32), labels


def _cifar_arrays(batches: list[Path], label_key: bytes, classes: int) -> tuple[np.ndarray, np.ndarray]:
    images, labels = zip(*(_cifar_batch(path, label_key, classes) for path in batches))
    return np.concatenate(images), np.concatenate(labels)


def _held_out(count: int, held: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(kept, held_out)`` of a seeded random split of ``range(count)``."""
    if not 0 < held < count:
        raise DataError(f"cannot hold {held} of {count} training samples out for validation")
    order = np.random.default_rng(seed).permutation(count)
    return np.sort(order[held:]), np.sort(order[:held])


def cifar(root: str | Path, classes: int = 10, val_size: int = 5000, image_size: int | None = None,
          seed: int = 0) -> Datasets:
    """CIFAR-10 (``classes=10``) or CIFAR-100 (``classes=100``, fine labels) from ``root``.

    ``val`` is ``val_size`` training images held out at random (``seed``); ``test`` is the
    official test set.
    """
    root = Path(root)
    if classes == 10:
        train_files, test_files, key = [root / f"data_batch_{i}" for i in range(1, 6)], [root / "test_batch"], b"labels"
    elif classes == 100:
        train_files, test_files, key = [root / "train"], [root / "test"], b"fine_labels"
    else:
        raise DataError(f"CIFAR has 10 or 100 classes, got classes={classes}")
    x, y = _cifar_arrays(train_files, key, classes)
    x_test, y_test = _cifar_arrays(test_files, key, classes)
    kept, held = _held_out(len(x), val_size, seed)
    return Datasets(ArrayImages(x[kept], y[kept], image_size), ArrayImages(x[held], y[held], image_size),
                    ArrayImages(x_test, y_test, image_size), classes, augment=crop_and_flip(4))


def cifar10(root: str | Path, val_size: int = 5000, image_size: int | None = None, seed: int = 0) -> Datasets:
    """CIFAR-10, python pickle layout (``root`` = the ``cifar-10-batches-py`` folder)."""
    return cifar(root, 10, val_size, image_size, seed)


def cifar100(root: str | Path, val_size: int = 5000, image_size: int | None = None, seed: int = 0) -> Datasets:
    """CIFAR-100 with its 100 fine labels (``root`` = the ``cifar-100-python`` folder)."""
    return cifar(root, 100, val_size, image_size, seed)


# -- image trees ------------------------------------------------------------------------


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def _class_files(root: Path, classes: list[str] | None = None, wanted: Callable[[Path], bool] = _is_image,
                 what: str = f"images ({', '.join(sorted(IMAGE_SUFFIXES))})") -> tuple[list[Path], list[int], list[str]]:
    """Files of ``root/<class>/...`` that ``wanted`` accepts (classes sorted by name unless given),
    and their labels. Every class folder must hold a file; with ``classes`` given (a test split
    read against its training split), ``root`` may hold no class the training split lacks."""
    found = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    training_split = classes is None
    if training_split:
        classes = found
    if not classes:
        raise DataError(f"folder {root} has no class sub-folders")
    foreign = sorted(set(found) - set(classes))
    if foreign:
        raise DataError(f"folder {root} has class folder(s) {', '.join(foreign[:5])} that the training split "
                        f"{root.parent / 'train'} lacks: its labels would be dropped; give both splits the same classes")
    files, labels = [], []
    for label, name in enumerate(classes):
        folder = root / name
        found_files = sorted(p for p in folder.rglob("*") if wanted(p)) if folder.is_dir() else []
        if not found_files and training_split:
            raise DataError(f"class folder {folder} has no {what}: an empty class cannot be learnt; "
                            "remove the folder or add its samples")
        files += found_files
        labels += [label] * len(found_files)
    if not files:
        raise DataError(f"folder {root} has no {what} in its class sub-folders")
    return files, labels, classes


class ImageFiles(Dataset):
    """Images read from disk as they are drawn, resized (shorter side to ``image_size * 8/7``)
    and center-cropped to ``image_size``; training augmentation comes on top (``Datasets.augment``)."""

    def __init__(self, files: list[Path], labels: list[int], image_size: int, grayscale: bool = False):
        self.files, self.targets = files, labels
        self.image_size, self.grayscale = image_size, grayscale

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        from PIL import Image

        try:
            with Image.open(self.files[index]) as image:
                image = image.convert("L" if self.grayscale else "RGB")
                image = self._center_crop(image)
        except Exception as error:  # Pillow raises many types on bad files (OSError, SyntaxError, ValueError,
            # DecompressionBombError for images over Image.MAX_IMAGE_PIXELS): each is a bad input file
            raise DataError(f"cannot read image {self.files[index]}: {first_line(error)}") from None
        array = np.asarray(image, dtype=np.float32) / 255.0
        tensor = torch.from_numpy(array[None] if self.grayscale else array.transpose(2, 0, 1).copy())
        return tensor, self.targets[index]

    def _center_crop(self, image):
        size = self.image_size
        short = max(size, round(size * 8 / 7))  # 256 for 224, as ImageNet evaluation does
        scale = short / min(image.size)
        image = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))))
        left, top = (image.width - size) // 2, (image.height - size) // 2
        return image.crop((left, top, left + size, top + size))


def _random_split(count: int, val_fraction: float, test_fraction: float, seed: int):
    order = np.random.default_rng(seed).permutation(count)
    n_test, n_val = round(count * test_fraction), round(count * val_fraction)
    if count - n_test - n_val < 1 or n_val < 1 or n_test < 1:
        raise DataError(f"{count} samples are too few for val_fraction={val_fraction}, test_fraction={test_fraction}")
    return order[n_test + n_val:], order[n_test:n_test + n_val], order[:n_test]


def _pick(items: list, indices) -> list:
    return [items[i] for i in indices]


def image_folder(root: str | Path, image_size: int = 32, grayscale: bool = False, val_fraction: float = 0.15,
                 test_fraction: float = 0.2, seed: int = 0) -> Datasets:
    """``root/<class name>/<image>`` files (any format Pillow reads), split at random with ``seed``."""
    files, labels, classes = _class_files(Path(root))
    train, val, test = _random_split(len(files), val_fraction, test_fraction, seed)

    def split(indices):
        return ImageFiles(_pick(files, indices), _pick(labels, indices), image_size, grayscale)

    return Datasets(split(train), split(val), split(test), len(classes), augment=crop_and_flip(max(1, image_size // 8)))


def imagenet_folder(root: str | Path, image_size: int = 224, val_size: int = 10000, seed: int = 0) -> Datasets:
    """The ImageNet layout: ``root/train/<class>/...`` and ``root/val/<class>/...``.

    ``test`` is the official validation set (what papers report); ``val``, which the
    policy scores trials on, is ``val_size`` training images held out at random.
    """
    root = Path(root)
    files, labels, classes = _class_files(root / "train")
    test_files, test_labels, _ = _class_files(root / "val", classes)
    kept, held = _held_out(len(files), min(val_size, len(files) // 2), seed)
    return Datasets(ImageFiles(_pick(files, kept), _pick(labels, kept), image_size),
                    ImageFiles(_pick(files, held), _pick(labels, held), image_size),
                    ImageFiles(test_files, test_labels, image_size), len(classes), augment=resized_crop_and_flip())


# -- event frames (SpikingJelly's frame conversion) ------------------------------------------


class FrameFiles(Dataset):
    """``.npz`` files holding ``frames`` ``[T, 2, H, W]``; samples are float ``[T, 2, H, W]``.

    Every file must hold ``frames_number`` frames (the T its folder is named after): batches
    stack the samples, so one file with another T would fail a whole batch.
    """

    def __init__(self, files: list[Path], labels: list[int], frames_number: int, image_size: int | None = None):
        self.files, self.targets, self.image_size = files, labels, image_size
        self.frames_number = frames_number

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        path = self.files[index]
        try:
            with np.load(path, allow_pickle=False) as arrays:  # an object array (a pickle) is refused
                frames = arrays["frames"]
        except Exception as error:  # not a zip, no 'frames', a pickled array, a truncated member
            raise DataError(f"{path} is not a frame file with array 'frames': {first_line(error)}") from None
        if frames.ndim != 4 or frames.shape[0] != self.frames_number or frames.shape[1] != 2:
            raise DataError(f"{path}: frames of shape {list(frames.shape)}, expected [{self.frames_number}, 2, H, W] "
                            f"(T = {self.frames_number}, the folder's frames_number; two polarities)")
        frames = torch.from_numpy(frames.astype(np.float32))
        if self.image_size and frames.shape[-1] != self.image_size:
            frames = F.interpolate(frames, size=(self.image_size, self.image_size), mode="bilinear",
                                   align_corners=False)
        return frames, self.targets[index]


def _frame_folder(root: Path, frames_number: int | None, split_by: str) -> tuple[Path, int]:
    """The ``frames_number_<T>_split_by_<how>`` folder to read, and its T."""
    pattern = re.compile(rf"frames_number_(\d+)_split_by_{re.escape(split_by)}$")
    found = {int(m.group(1)): p for p in (root.iterdir() if root.is_dir() else []) if (m := pattern.match(p.name))}
    if frames_number is not None and frames_number in found:
        return found[frames_number], frames_number
    if frames_number is None and len(found) == 1:
        return next(iter(found.values())), next(iter(found))
    raise DataError(f"{root} has {'no' if not found else 'several'} frames_number_<T>_split_by_{split_by} folders "
                    f"({', '.join(sorted(p.name for p in found.values())) or 'none'}); convert the events with "
                    "SpikingJelly (frames_number=T, split_by=...) or give data.args.frames_number")


def _frame_files(root: Path, classes: list[str] | None = None) -> tuple[list[Path], list[int], list[str]]:
    return _class_files(root, classes, lambda p: p.suffix == ".npz", "<sample>.npz frame files")


def dvs_frames(root: str | Path, frames_number: int | None = None, split_by: str = "number",
               image_size: int | None = None, val_fraction: float = 0.1, test_fraction: float = 0.1,
               seed: int = 0) -> Datasets:
    """Event frames from SpikingJelly's conversion; T is the files' frame count.

    With ``train/`` and ``test/`` folders (DVS128 Gesture) the official split is kept and
    ``val_fraction`` of train is held out; with class folders only (CIFAR10-DVS) the
    samples are split at random. Batches are time-major ``[T, N, 2, H, W]``.
    """
    folder, frames_number = _frame_folder(Path(root), frames_number, split_by)
    if (folder / "train").is_dir() and (folder / "test").is_dir():
        files, labels, classes = _frame_files(folder / "train")
        test_files, test_labels, _ = _frame_files(folder / "test", classes)
        kept, held = _held_out(len(files), max(1, round(len(files) * val_fraction)), seed)
        splits = [(_pick(files, kept), _pick(labels, kept)), (_pick(files, held), _pick(labels, held)),
                  (test_files, test_labels)]
    else:
        files, labels, classes = _frame_files(folder)
        splits = [(_pick(files, i), _pick(labels, i))
                  for i in _random_split(len(files), val_fraction, test_fraction, seed)]
    train, val, test = (FrameFiles(f, y, frames_number, image_size) for f, y in splits)
    return Datasets(train, val, test, len(classes), augment=crop_and_flip(padding=4), time_major=True)


# -- arrays in memory ------------------------------------------------------------------------


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
        with np.load(path, allow_pickle=False) as arrays:  # an object array (a pickle) is refused, never run
            x, y = arrays["x"], arrays["y"]
    except KeyError as missing:
        raise DataError(f"{path} must hold arrays 'x' and 'y' (missing {missing})") from None
    except Exception as error:  # not a zip, a pickled array, a truncated member
        raise DataError(f"{path} is not a readable .npz file: {first_line(error)}") from None
    if x.ndim == 3:
        x = x[:, None]
    return split_arrays(resize(x.astype(np.float32), image_size), y, val_fraction, test_fraction, seed)
