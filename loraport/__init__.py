"""loraport: merge, convert, re-quantize and export LoRA / QLoRA adapters from every ecosystem.

Public API (each also a CLI command; see loraport/api.py): `merge`, `convert`, `export_onnx`, `validate`,
`inspect`, `verify`, `load_adapter`; errors are `LoraportError` subclasses (loraport/errors.py), results the
frozen records of loraport/results.py. `import loraport` stays light: the engines load on first use.
"""

from loraport._version import __version__
from loraport.api import convert, export_onnx, inspect, merge, validate, verify
from loraport.errors import LoraportError
from loraport.formats import load_adapter

__all__ = ["LoraportError", "__version__", "convert", "export_onnx", "inspect", "load_adapter", "merge",
           "validate", "verify"]

_RESULTS = ("ConvertResult", "ExportResult", "InspectResult", "MergeResult", "ValidationReport", "VerifyResult")


def __getattr__(name):  # the result types, without importing them (and dataclasses) up front
    if name in _RESULTS:
        from loraport import results

        return getattr(results, name)
    raise AttributeError(f"module 'loraport' has no attribute {name!r}")
