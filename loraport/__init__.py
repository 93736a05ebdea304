"""loraport: merge, convert, re-quantize and export LoRA / QLoRA adapters from every ecosystem.

Public API (each also a CLI command): `load_adapter`, `merge`, `convert`, `export_onnx`, `validate`.
"""

__version__ = "0.1.0"

from loraport.errors import LoraportError  # noqa: E402
from loraport.formats import load_adapter  # noqa: E402
from loraport.merging import merge  # noqa: E402  (binds the function over the submodule's name on purpose)

__all__ = ["LoraportError", "__version__", "convert", "export_onnx", "load_adapter", "merge", "validate"]


def __getattr__(name):  # the heavier entry points load on first use
    if name == "convert":
        from loraport.conversion import convert_adapter

        return convert_adapter
    if name == "export_onnx":
        from loraport.onnx import export_onnx

        return export_onnx
    if name == "validate":
        from loraport.parity import validate

        return validate
    raise AttributeError(name)
