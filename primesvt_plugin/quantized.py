"""What a quantizer hands back: something that saves itself, predicts, and knows its size."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .export import run_openvino, save_openvino


@dataclass
class OpenVINOArtifact:
    """A (quantized) OpenVINO model."""

    ov_model: object

    def save(self, path: Path) -> list[Path]:
        """Write ``path`` (.xml) and the .bin holding the weights."""
        return save_openvino(self.ov_model, path.with_suffix(".xml"))

    def predict(self, images: np.ndarray) -> np.ndarray:
        return run_openvino(self.ov_model, images, batch_size=16)

    @staticmethod
    def weight_bytes(files: list[Path]) -> int:
        """Bytes of stored weights: the .bin files written by ``save``."""
        return sum(f.stat().st_size for f in files if f.suffix == ".bin")
