"""The package version, in a module of its own: every module that records it (manifests, ONNX metadata, the
CLI's --version) imports it from here, never from the package root, which re-exports the engines."""

__version__ = "0.1.0"
