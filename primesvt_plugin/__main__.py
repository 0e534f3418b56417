"""``python -m primesvt_plugin`` is the ``primesvt`` command (what ``torchrun -m`` starts)."""
import sys

from .pipeline.cli import main

sys.exit(main())
