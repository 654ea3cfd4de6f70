"""Engine backends: what executes a step's math for LLMEngineRunner.

"triton" is the engine's own forward (engine/model.py: Triton kernels and cuBLAS, CUDA graphs) and
the reference. "onnxruntime" and "tensorrt" run the graph `edgellm export` wrote (export/), through
ExportedSteps (exported_steps.py here): the same prefill_step / decode_step interface, the runner's
own KV cache, logits and input tensors bound to the engine by data pointer, so a step copies nothing
between torch and the engine (the KV cache is updated in place).
"""

from __future__ import annotations

from ...errors import BackendError

BACKENDS = ("triton", "onnxruntime", "tensorrt")


def check_backend(backend) -> str:
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return backend


def open_engine(backend: str, export_dir, description: dict, device, limits: dict):
    """The engine object of an exported backend: run(inputs, outputs, decode) on torch tensors."""
    if backend == "onnxruntime":
        from .onnxruntime_engine import OnnxRuntimeEngine
        return OnnxRuntimeEngine(export_dir, description, device)
    from .tensorrt_engine import TensorRTEngine
    return TensorRTEngine(export_dir, description, device, limits)
