"""Datasets for recipes (``data.name``): scikit-learn digits, .npz arrays, image folders, ImageNet,
CIFAR-10/100 and SpikingJelly's DVS frames."""
from __future__ import annotations

from ..pipeline.readers import digits_splits, npz_splits
from ..pipeline.readers import cifar10, cifar100, dvs_frames, image_folder, imagenet_folder
from ..plugins import hookimpl


@hookimpl
def primesvt_register(registrar):
    registrar.datasets.add("digits", digits_splits)
    registrar.datasets.add("npz", npz_splits)
    registrar.datasets.add("image_folder", image_folder)
    registrar.datasets.add("imagenet_folder", imagenet_folder)
    registrar.datasets.add("cifar10", cifar10)
    registrar.datasets.add("cifar100", cifar100)
    registrar.datasets.add("dvs_frames", dvs_frames)
