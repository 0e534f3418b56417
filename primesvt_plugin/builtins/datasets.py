"""Datasets for recipes (``data.name``): scikit-learn digits, a .npz file, an image folder."""
from __future__ import annotations

from ..data import digits_splits, image_folder_splits, npz_splits
from ..plugins import hookimpl


@hookimpl
def primesvt_datasets():
    return {"digits": digits_splits, "npz": npz_splits, "image_folder": image_folder_splits}
