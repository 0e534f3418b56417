"""Datasets for recipes (``data.name``): scikit-learn digits, a .npz file, an image folder."""
from __future__ import annotations

from ..pipeline.data import digits_splits, image_folder_splits, npz_splits
from ..plugins import hookimpl


@hookimpl
def primesvt_register(registrar):
    registrar.datasets.add("digits", digits_splits)
    registrar.datasets.add("npz", npz_splits)
    registrar.datasets.add("image_folder", image_folder_splits)
