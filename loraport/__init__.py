"""loraport: merge, convert, re-quantize and export LoRA / QLoRA adapters from every ecosystem.

Public API (each also a CLI command; see loraport/api.py): `merge`, `convert`, `export_onnx`, `validate`,
`inspect`, `verify`, `load_adapter`; errors are `LoraportError` subclasses (loraport/errors.py), results the
frozen records of loraport/results.py. `import loraport` stays light (and `loraport --help` fast): the engines,
and torch behind them, load on first use.
"""

from loraport import interrupts as _interrupts

_interrupts.install_if_entry()  # as the `loraport` process: Ctrl-C is one line from the first moment

from loraport._version import __version__  # noqa: E402
from loraport.api import convert, export_onnx, inspect, merge, validate, verify  # noqa: E402
from loraport.errors import LoraportError  # noqa: E402
from loraport.formats import load_adapter  # noqa: E402

__all__ = ["LoraportError", "__version__", "convert", "export_onnx", "inspect", "load_adapter", "merge",
           "validate", "verify"]

_RESULTS = ("ConvertResult", "ExportResult", "InspectResult", "MergeResult", "ValidationReport", "VerifyResult")


def __getattr__(name):  # the result types, without importing them (and dataclasses) up front
    if name in _RESULTS:
        from loraport import results

        return getattr(results, name)
    raise AttributeError(f"module 'loraport' has no attribute {name!r}")
