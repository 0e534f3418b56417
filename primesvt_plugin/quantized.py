"""What a quantizer hands back: an artifact that saves itself, predicts, and knows its size and speed."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import CheckpointError, first_line
from .export import compile_openvino, compiled_precision, predict_compiled, save_openvino
from .latency import median_ms


@dataclass
class OpenVINOArtifact:
    """A (quantized) OpenVINO model, compiled for the CPU at ``precision`` on first use.

    ``precision`` applies to the operations left in floating point (INT8 ones stay INT8).
    """

    ov_model: object
    precision: str = "f32"

    @functools.cached_property
    def compiled(self):
        return compile_openvino(self.ov_model, self.precision)

    @property
    def compiled_precision(self) -> str:
        """The precision the CPU really runs the floating-point operations at (read back)."""
        return compiled_precision(self.compiled)

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


def load_quantized(path: str | Path, precision: str = "f32") -> OpenVINOArtifact:
    """Load ``model_int8.xml`` (with its .bin) written by a recipe run, to run at ``precision``."""
    import openvino as ov

    path = Path(path)
    if not path.is_file() or not path.with_suffix(".bin").is_file():
        raise CheckpointError(f"{path} and its .bin are needed to load a quantized model")
    try:
        artifact = OpenVINOArtifact(ov.Core().read_model(str(path)), precision)
        artifact.compiled  # a truncated .bin only shows when the weights are read
    except RuntimeError as error:
        raise CheckpointError(f"{path} is not a readable OpenVINO model (truncated or another format?): "
                              f"{first_line(error)}") from None
    return artifact
