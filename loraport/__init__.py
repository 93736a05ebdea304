"""loraport: merge, convert, re-quantize and export LoRA / QLoRA adapters from every ecosystem.

Public API (each also a CLI command): `load_adapter`, `merge`, `convert`, `export_onnx`, `validate`.
Every entry point loads on first use, so `import loraport` (and `loraport --help`) never imports torch.
"""

import sys as _sys
import types as _types

from loraport import interrupts as _interrupts

_interrupts.install_if_entry()  # as the `loraport` process: Ctrl-C is one line from the first moment

__version__ = "0.1.0"

from loraport.errors import LoraportError  # noqa: E402

__all__ = ["LoraportError", "__version__", "convert", "export_onnx", "load_adapter", "merge", "validate"]


_FUNCTIONS = {  # public name -> (module, function); three share their name with the module that holds them
    "merge": ("loraport.merge", "merge"),
    "load_adapter": ("loraport.formats", "load_adapter"),
    "convert": ("loraport.convert", "convert_adapter"),
    "export_onnx": ("loraport.onnx", "export_onnx"),
    "validate": ("loraport.validate", "validate"),
}


def __getattr__(name):  # the entry points (and torch behind them) load on first use
    if name not in _FUNCTIONS:
        raise AttributeError(name)
    import importlib

    mod, fn = _FUNCTIONS[name]
    f = getattr(importlib.import_module(mod), fn)
    globals()[name] = f
    return f


class _Package(_types.ModuleType):
    """`loraport.merge` (`convert`, `validate`) stays the function when the submodule of the same name is
    imported (the import system would bind the module over it, as `from loraport import validate` once did)."""

    def __setattr__(self, name, value):
        if name in _FUNCTIONS and isinstance(value, _types.ModuleType):
            return
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package
