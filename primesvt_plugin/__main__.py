"""``python -m primesvt_plugin`` is the ``primesvt`` command (what ``torchrun -m`` starts)."""
from .pipeline.cli import entry

entry()
