"""Exporting a model for other engines: ONNX graphs of the decoder (export/onnx_graph.py) that the
runner's onnxruntime and TensorRT backends (engine/backends/) run on its own buffers."""

from .onnx_graph import export_onnx

__all__ = ["export_onnx"]
