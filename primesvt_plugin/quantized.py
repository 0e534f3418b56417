"""What a quantizer hands back: an artifact that saves itself, predicts, and knows its size and speed."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .export import predict_compiled, save_openvino
from .latency import median_ms


@dataclass
class OpenVINOArtifact:
    """A (quantized) OpenVINO model, compiled for the CPU on first use."""

    ov_model: object

    @functools.cached_property
    def compiled(self):
        import openvino as ov

        return ov.Core().compile_model(self.ov_model, "CPU")

    def save(self, path: Path) -> list[Path]:
        """Write ``path`` (.xml) and the .bin holding the weights."""
        return save_openvino(self.ov_model, path.with_suffix(".xml"))

    def predict(self, images: np.ndarray) -> np.ndarray:
        return predict_compiled(self.compiled, images)

    def latency_ms(self, image: np.ndarray) -> float:
        """Median latency of one inference on ``image`` (a batch of one)."""
        return median_ms(lambda: self.compiled(image))

    @staticmethod
    def weight_bytes(files: list[Path]) -> int:
        """Bytes of stored weights: the .bin files written by ``save``."""
        return sum(f.stat().st_size for f in files if f.suffix == ".bin")


def load_quantized(path: str | Path) -> OpenVINOArtifact:
    """Load ``model_int8.xml`` (with its .bin) written by a recipe run."""
    import openvino as ov

    path = Path(path)
    if not path.is_file() or not path.with_suffix(".bin").is_file():
        raise FileNotFoundError(f"{path} and its .bin are needed to load a quantized model")
    return OpenVINOArtifact(ov.Core().read_model(str(path)))
