"""Post-training quantization with NNCF (recipe ``quantize.method``): INT8, and INT4/INT8 weight compression."""
from __future__ import annotations

from ..deploy.quantization import nncf_int4, nncf_int8
from ..plugins import hookimpl


@hookimpl
def primesvt_register(registrar):
    registrar.quantizers.add("nncf_int8", nncf_int8)
    registrar.quantizers.add("nncf_int4", nncf_int4)
