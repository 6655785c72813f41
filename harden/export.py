"""Kept so that code written against the flat layout (`from harden.export import export_onnx`) still imports;
the code lives in `harden.io.export`."""

from harden.io.export import export_onnx

__all__ = ["export_onnx"]
