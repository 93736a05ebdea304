"""loraport: merge, convert, re-quantize and export LoRA / QLoRA adapters from every ecosystem."""

__version__ = "0.1.0"

from loraport.errors import LoraportError  # noqa: E402

__all__ = ["LoraportError", "__version__", "load_adapter", "merge"]


def __getattr__(name):  # lazy public API: keeps `import loraport` cheap for the CLI
    if name == "load_adapter":
        from loraport.formats import load_adapter

        return load_adapter
    if name == "merge":
        from loraport.merge import merge

        return merge
    raise AttributeError(name)
