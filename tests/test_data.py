"""Datasets that stream: CIFAR pickles, image trees, the ImageNet layout and DVS frames, written
here in their documented on-disk formats (tiny), read back through the recipes' path."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from primesvt_plugin import DataError, Datasets
from primesvt_plugin.pipeline.cli import main
from primesvt_plugin.pipeline.datasets import as_datasets
from primesvt_plugin.pipeline.readers import digits_splits
from primesvt_plugin.pipeline.readers import (cifar10, cifar100, crop_and_flip, dvs_frames, image_folder,
                                               imagenet_folder, resized_crop_and_flip)

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


def write_cifar(root, batches: dict[str, int], classes: int = 10, label_key: bytes = b"labels"):
    """CIFAR's python layout: pickled dicts with uint8 ``data`` [N, 3072] and a label list.
    Image k of a file is filled with the value (k * 7 + file index) % 255 + 1 (never 0) so it can be recognised."""
    root.mkdir(parents=True, exist_ok=True)
    for index, (name, count) in enumerate(batches.items()):
        data = np.stack([np.full(3072, (k * 7 + index) % 255 + 1, dtype=np.uint8) for k in range(count)])
        labels = [(k + index) % classes for k in range(count)]
        with open(root / name, "wb") as file:
            pickle.dump({b"data": data, label_key: labels, b"batch_label": name.encode()}, file)
    return root


def write_images(root, per_class: int = 10, size: int = 12, seed: int = 0):
    rng = np.random.default_rng(seed)
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(np.array(colour) * rng.uniform(0.6, 1.0) + rng.integers(0, 40, (size, size, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i}.png")
    return root


def write_frames(folder, classes: int = 2, per_class: int = 5, T: int = 4, size: int = 8):
    """SpikingJelly frame conversion output: <class>/<sample>.npz holding frames [T, 2, H, W];
    class c's frames are all c + 1 (so a sample's class is readable from it)."""
    for c in range(classes):
        (folder / f"class_{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            np.savez(folder / f"class_{c}" / f"sample_{i}.npz", frames=np.full((T, 2, size, size), c + 1, np.float32))


def everything(data: Datasets, split: str):
    batches = list(data.loader(split, 64))
    return torch.cat([x for x, _ in batches], dim=1 if data.time_major else 0), torch.cat([y for _, y in batches])


def test_cifar10_reads_the_pickle_layout_holds_out_val_and_keeps_the_official_test(tmp_path):
    root = write_cifar(tmp_path / "cifar-10-batches-py", {**{f"data_batch_{i}": 8 for i in range(1, 6)},
                                                          "test_batch": 6})
    data = cifar10(root, val_size=10, seed=3)
    assert (len(data.train), len(data.val), len(data.test), data.num_classes) == (30, 10, 6, 10)
    x_test, y_test = everything(data, "test")
    assert x_test.shape == (6, 3, 32, 32) and x_test.dtype == torch.float32
    # the test batch is the 6th file (index 5): image k is (7k + 6) / 255 everywhere, label (k + 5) % 10
    assert torch.allclose(x_test[:, 0, 0, 0], torch.tensor([(7 * k + 6) / 255 for k in range(6)]))
    assert y_test.tolist() == [(k + 5) % 10 for k in range(6)] == data.labels("test").tolist()
    # train and val partition the 40 training images; the split follows the seed
    values = lambda split: sorted(round(float(v) * 255) for v in everything(data, split)[0][:, 0, 0, 0])  # noqa: E731
    assert sorted(values("train") + values("val")) == sorted((7 * k + i) % 255 + 1 for i in range(5) for k in range(8))
    assert values("val") != sorted(round(float(v) * 255) for v in everything(cifar10(root, 10, seed=4), "val")[0]
                                   [:, 0, 0, 0])
    resized = cifar10(root, val_size=10, image_size=16)
    assert resized.example().shape == (1, 3, 16, 16)


def test_cifar100_uses_the_fine_labels(tmp_path):
    root = write_cifar(tmp_path / "cifar-100-python", {"train": 20, "test": 5}, classes=100, label_key=b"fine_labels")
    data = cifar100(root, val_size=5)
    assert data.num_classes == 100 and data.labels("test").tolist() == [(k + 1) % 100 for k in range(5)]
    with pytest.raises(DataError, match="data_batch_1 is missing.*python version"):
        cifar10(root)


def test_augmentation_only_in_shuffled_training_loaders(tmp_path):
    root = write_cifar(tmp_path / "c", {**{f"data_batch_{i}": 8 for i in range(1, 6)}, "test_batch": 4})
    data = cifar10(root, val_size=8)
    # a ramp image: cropping or flipping it changes it
    ramp = torch.arange(32.0).expand(3, 32, 32) / 32
    torch.manual_seed(0)
    changed = [not torch.equal(crop_and_flip(4)(ramp), ramp) for _ in range(20)]
    assert any(changed) and crop_and_flip(4)(ramp).shape == ramp.shape
    torch.manual_seed(0)
    assert any(not torch.equal(resized_crop_and_flip()(ramp), ramp) for _ in range(10))
    plain = torch.stack([data.train[i][0] for i in range(len(data.train))])
    eval_batches = torch.cat([x for x, _ in data.loader("train", 64)])
    assert torch.equal(eval_batches, plain)  # unshuffled: as stored
    torch.manual_seed(1)
    train_batches = torch.cat([x for x, _ in data.loader("train", 64, shuffle=True)])
    zero_borders = (train_batches[..., 0, :] == 0).all(-1).any() or (train_batches[..., :, 0] == 0).all(-1).any()
    assert zero_borders  # padded crops show zero rows/columns somewhere; stored images never do
    assert not (plain[..., 0, :] == 0).all(-1).any()
    assert data.images("train", 3).shape == (3, 3, 32, 32)  # calibration reads images as they are
    np.testing.assert_array_equal(data.images("train", 3), plain[:3].numpy())


def test_image_folder_streams_files_split_at_random(tmp_path):
    root = write_images(tmp_path / "images")
    data = image_folder(root, image_size=8, val_fraction=0.2, test_fraction=0.2)
    assert data.num_classes == 3 and len(data.train) + len(data.val) + len(data.test) == 30
    assert len(data.val) == len(data.test) == 6
    x, y = (torch.cat(parts) for parts in zip(*(everything(data, s) for s in ("train", "val", "test"))))
    assert x.shape == (30, 3, 8, 8) and 0.0 <= x.min() and x.max() <= 1.0
    for label in range(3):  # classes are sorted by folder name: blue, green, red; each image is mostly its colour
        assert (x[y == label].mean(dim=(2, 3)).argmax(1) == [2, 1, 0][label]).all()
    assert image_folder(root, image_size=8, grayscale=True).example().shape == (1, 1, 8, 8)
    with pytest.raises(DataError, match="no class sub-folders"):
        image_folder(tmp_path / "missing")


def test_imagenet_folder_keeps_the_official_val_as_test_and_holds_out_train_for_the_search(tmp_path):
    write_images(tmp_path / "imagenet" / "train", per_class=8, size=40)
    write_images(tmp_path / "imagenet" / "val", per_class=2, size=40, seed=1)
    data = imagenet_folder(tmp_path / "imagenet", image_size=32, val_size=6)
    assert (len(data.train), len(data.val), len(data.test), data.num_classes) == (18, 6, 6, 3)
    assert all("/val/" in str(f) for f in data.test.files) and all("/train/" in str(f) for f in data.val.files)
    assert not set(data.val.files) & set(data.train.files)
    x, y = everything(data, "test")
    assert x.shape == (6, 3, 32, 32) and y.tolist() == [0, 0, 1, 1, 2, 2]


def test_dvs_frames_official_split_and_time_major_batches(tmp_path):
    folder = tmp_path / "DVS128Gesture" / "frames_number_4_split_by_number"
    write_frames(folder / "train", per_class=5)
    write_frames(folder / "test", per_class=2)
    data = dvs_frames(tmp_path / "DVS128Gesture", val_fraction=0.2)
    assert data.time_major and (len(data.train), len(data.val), len(data.test)) == (8, 2, 4)
    x, y = everything(data, "test")
    assert x.shape == (4, 4, 2, 8, 8)  # [T, N, 2, H, W]: T from the files
    assert torch.equal(x[:, :, 0, 0, 0], (y + 1).float().expand(4, 4))  # each sample kept its own class
    assert data.example().shape == (4, 1, 2, 8, 8) and data.images("test", 3).shape == (4, 3, 2, 8, 8)


def test_dvs_frames_without_a_split_and_with_the_wrong_frame_count(tmp_path):
    write_frames(tmp_path / "CIFAR10DVS" / "frames_number_4_split_by_number", classes=3, per_class=10)
    data = dvs_frames(tmp_path / "CIFAR10DVS", val_fraction=0.1, test_fraction=0.2)
    assert (len(data.train), len(data.val), len(data.test), data.num_classes) == (21, 3, 6, 3)
    with pytest.raises(DataError, match="frames_number_<T>_split_by_number.*frames_number_4_split_by_number"):
        dvs_frames(tmp_path / "CIFAR10DVS", frames_number=16)


def test_in_memory_splits_become_datasets_through_the_same_path():
    splits = digits_splits(image_size=8)
    data = as_datasets(splits)
    assert len(data.val) == len(splits.y_val) and data.labels("val").tolist() == splits.y_val.tolist()
    np.testing.assert_array_equal(data.images("test", 5), splits.x_test[:5])
    with pytest.raises(DataError, match="returned list.*Datasets"):
        as_datasets([1, 2])


SMALL_CIFAR_SPIKFORMER = "{T: 2, in_channels: 3, img_size_h: 32, img_size_w: 32, patch_size: 4, num_classes: 10, " \
                         "embed_dims: 32, num_heads: 2, mlp_ratio: 2, depths: 1}"


@pytest.mark.parametrize("recipe", ["spikformer_cifar10", "spikformer_imagenet"])
def test_shipped_data_recipes_validate_on_tiny_data_in_their_format(recipe, tmp_path, capsys):
    if recipe == "spikformer_cifar10":
        root = write_cifar(tmp_path / "cifar", {**{f"data_batch_{i}": 8 for i in range(1, 6)}, "test_batch": 6})
        overrides = [f"data.args.root={root}", "data.args.val_size=10"]
    else:
        write_images(tmp_path / "imagenet" / "train", per_class=8, size=40)
        write_images(tmp_path / "imagenet" / "val", per_class=2, size=40, seed=1)
        overrides = [f"data.args.root={tmp_path / 'imagenet'}", "data.args.val_size=6", "data.args.image_size=32",
                     "model.args.img_size_h=32", "model.args.img_size_w=32", "model.args.patch_size=4",
                     "model.args.depths=1", "model.args.embed_dims=32", "model.args.num_heads=2"]
    sets = [arg for override in overrides for arg in ("--set", override)]
    assert main(["validate", recipe, *sets, "--set", "data.workers=0"]) == 0
    assert capsys.readouterr().out.strip() == f"{recipe}: ok"


def test_one_batch_smoke_run_on_tiny_cifar(tmp_path):
    root = write_cifar(tmp_path / "cifar", {**{f"data_batch_{i}": 8 for i in range(1, 6)}, "test_batch": 6})
    out = tmp_path / "out"
    args = ["run", "spikformer_cifar10", "--quiet", "--out", str(out), "--set", f"data.args.root={root}",
            "--set", "data.args.val_size=10", "--set", "model.name=spikformer", "--set", f"model.args={SMALL_CIFAR_SPIKFORMER}",
            "--set", "data.workers=0", "--set", "data.val_subset=null", "--set", "data.batch_size=64",
            "--set", "train={epochs: 1, batch_size: 64}", "--set", "finetune={epochs: 1, batch_size: 64}",
            "--set", "prune.max_accuracy_drop=1.0", "--set", "quantize=null", "--set", "export=null"]
    assert main(args) == 3  # written, but tiny made-up data leaves the model at chance: that check fails
    report = json.loads((out / "report.json").read_text())
    assert [name for name, check in report["checks"].items() if not check["ok"]] == ["baseline above chance level"]
    assert [stage["stage"] for stage in report["stages"]] == ["fp32", "pruned + finetuned"]
    assert report["prune"]["pruned"]["parameter_saving"] >= 0.2668


# -- hostile and corrupt files: refused in one line naming the file, never run ----------------------------


class RunsCode:
    """A pickled object whose unpickling would call ``os.system(command)``."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        import os
        return os.system, (self.command,)


def write_pickle(path, payload) -> None:
    with open(path, "wb") as file:
        pickle.dump(payload, file)


@pytest.mark.parametrize("where", ["the batch itself", "its batch_label"])
def test_a_cifar_batch_carrying_code_is_refused_without_running_it(where, tmp_path, capsys):
    root = write_cifar(tmp_path / "cifar", {**{f"data_batch_{i}": 8 for i in range(1, 6)}, "test_batch": 6})
    marker = tmp_path / "ran"
    payload = RunsCode(f"touch {marker}")
    batch = payload if where == "the batch itself" else {
        b"data": np.zeros((8, 3072), np.uint8), b"labels": [0] * 8, b"batch_label": payload}
    write_pickle(root / "data_batch_3", batch)
    with pytest.raises(DataError, match=r"data_batch_3 is not a CIFAR batch: .*posix\.system"):
        cifar10(root, val_size=10)
    assert not marker.exists()
    assert main(["validate", "spikformer_cifar10", "--set", f"data.args.root={root}", "--set", "data.workers=0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data_batch_3 is not a CIFAR batch" in err[0], err
    assert not marker.exists()


def test_a_cifar_batch_written_by_python_2_numpy_still_reads(tmp_path):
    """The official files are protocol-2 pickles of numpy arrays (bytes encoded through _codecs)."""
    root = tmp_path / "cifar"
    root.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(root / name, "wb") as file:
            pickle.dump({b"data": np.full((4, 3072), 9, np.uint8), b"labels": [1, 2, 3, 4],
                         b"batch_label": b"training batch", b"filenames": [b"a.png"] * 4}, file, protocol=2)
    data = cifar10(root, val_size=4)
    assert (len(data.train), len(data.test)) == (16, 4) and data.labels("test").tolist() == [1, 2, 3, 4]


@pytest.mark.parametrize("corrupt, message", [
    ({b"data": np.zeros((6, 3072), np.uint8), b"labels": list(range(10)) * 11}, "6 images but 110 labels"),
    ({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 10, 2]}, "label 10 .* outside 0..9"),
    ({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, -1, 2]}, "label -1 .* outside 0..9"),
    ({b"labels": [0, 1]}, r"the CIFAR batch lacks b'data'"),
    ({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}, r"uint8 array \[N, 3072\]"),
    ([1, 2, 3], "holds a list, not a dict"),
])
def test_corrupt_cifar_batches_are_refused_naming_the_file(corrupt, message, tmp_path):
    root = write_cifar(tmp_path / "cifar", {**{f"data_batch_{i}": 8 for i in range(1, 6)}, "test_batch": 6})
    write_pickle(root / "data_batch_2", corrupt)
    with pytest.raises(DataError, match=f"data_batch_2.*{message}"):
        cifar10(root, val_size=10)


def test_class_folders_that_would_shift_or_drop_labels_are_refused(tmp_path):
    root = write_images(tmp_path / "images")
    (root / "empty").mkdir()
    with pytest.raises(DataError, match=r"class folder .*empty has no images"):
        image_folder(root)
    write_images(tmp_path / "imagenet" / "train", per_class=4, size=40)
    write_images(tmp_path / "imagenet" / "val", per_class=1, size=40)
    (tmp_path / "imagenet" / "val" / "violet").mkdir()
    Image.new("RGB", (40, 40)).save(tmp_path / "imagenet" / "val" / "violet" / "0.png")
    with pytest.raises(DataError, match=r"val has class folder\(s\) violet that the training split .*train lacks"):
        imagenet_folder(tmp_path / "imagenet", image_size=32, val_size=3)


def test_a_model_with_fewer_outputs_than_the_data_has_classes_is_refused(tmp_path, capsys):
    root = write_images(tmp_path / "images", size=16)  # 3 classes
    args = ["validate", "spikformer_digits", "--set", "data.name=image_folder",
            "--set", f"data.args={{root: {root}, image_size: 16, grayscale: true}}", "--set", "model.args.num_classes=2"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "gives 2 class scores, but dataset 'image_folder' has 3 classes" in err[0], err


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels, with no pixel data."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


BAD_IMAGES = {
    "bomb.png": png_header_only(20000, 20000),  # 400 megapixels: Pillow's decompression-bomb guard
    "short.ppm": b"P6\n32 32\n255\n" + bytes(87),  # a 100-byte PPM: header, then too few pixels
    "short.bmp": b"BM" + bytes(98),
    "text.pgm": b"P2\n2 2\n255\n1 2 x 4\n",  # a text PGM with a value that is not a number
}


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
@pytest.mark.parametrize("workers", [0, 1])
def test_a_bad_image_deep_in_the_data_is_one_line_naming_it(name, workers, tmp_path, capsys):
    root = write_images(tmp_path / "images", per_class=4, size=16)
    (root / "red" / name).write_bytes(BAD_IMAGES[name])
    assert root / "red" / name in image_folder(root, 16, grayscale=True).train.files  # read while training
    args = ["run", "spikformer_digits", "--quiet", "--out", str(tmp_path / "out"), "--set", "data.name=image_folder",
            "--set", f"data.args={{root: {root}, image_size: 16, grayscale: true}}", "--set", f"data.workers={workers}",
            "--set", "model.args.num_classes=3", "--set", "train.epochs=1", "--set", "prune=null",
            "--set", "finetune=null", "--set", "quantize=null", "--set", "export=null"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot read image {root / 'red' / name}" in err[0], err
    assert "Traceback" not in err[0] and "worker process" not in err[0]
    assert "the output folder was left as it was" in err[0]  # found while running: not "nothing ran"
    assert not (tmp_path / "out").exists()


def test_event_frames_with_another_frame_count_are_refused_naming_the_file(tmp_path):
    folder = tmp_path / "CIFAR10DVS" / "frames_number_4_split_by_number"
    write_frames(folder, classes=2, per_class=5)
    np.savez(folder / "class_1" / "sample_3.npz", frames=np.ones((6, 2, 8, 8), np.float32))
    data = dvs_frames(tmp_path / "CIFAR10DVS", val_fraction=0.2, test_fraction=0.2)
    with pytest.raises(DataError, match=r"sample_3.npz: frames of shape \[6, 2, 8, 8\], expected \[4, 2, H, W\]"):
        everything(data, "train"), everything(data, "val"), everything(data, "test")


def test_pickled_arrays_in_npz_files_are_refused_without_running_them(tmp_path):
    marker = tmp_path / "ran"
    objects = np.empty(1, dtype=object)
    objects[0] = RunsCode(f"touch {marker}")
    np.savez(tmp_path / "data.npz", x=objects, y=np.zeros(1, np.int64))
    from primesvt_plugin.pipeline.readers import npz_splits
    with pytest.raises(DataError, match="data.npz is not a readable .npz file: .*allow_pickle"):
        npz_splits(tmp_path / "data.npz")
    frames = tmp_path / "DVS" / "frames_number_4_split_by_number"
    write_frames(frames, classes=2, per_class=5)
    np.savez(frames / "class_0" / "sample_0.npz", frames=objects)
    data = dvs_frames(tmp_path / "DVS", val_fraction=0.2, test_fraction=0.2)
    with pytest.raises(DataError, match="sample_0.npz is not a frame file"):
        everything(data, "train"), everything(data, "val"), everything(data, "test")
    assert not marker.exists()
