"""INT8 post-training quantization with NNCF (recipe ``quantize.method``)."""
from __future__ import annotations

from ..deploy.quantization import nncf_int8
from ..plugins import hookimpl


@hookimpl
def primesvt_register(registrar):
    registrar.quantizers.add("nncf_int8", nncf_int8)
