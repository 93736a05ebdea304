"""ONNX: merged / quantized / multi-LoRA export, `.onnx_adapter` files, baking adapters into existing ONNX
models. Specs: formats/onnx.md, formats/onnx-adapter.md. Imports are lazy so `import loraport` stays cheap."""

from __future__ import annotations

__all__ = ["bake", "cli_convert", "export_onnx", "write_onnx_adapter"]


def __getattr__(name):
    if name == "export_onnx":
        from loraport.onnx.export import export_onnx

        return export_onnx
    if name == "bake":
        from loraport.onnx.baking import bake

        return bake
    if name == "cli_convert":
        from loraport.onnx.cli import cli_convert

        return cli_convert
    if name == "write_onnx_adapter":
        from loraport.onnx.cli import write_onnx_adapter

        return write_onnx_adapter
    raise AttributeError(name)
