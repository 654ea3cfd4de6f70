"""Engine backends: what executes a step's math for LLMEngineRunner.

"triton" is the engine's own forward (engine/model.py: Triton kernels and cuBLAS, CUDA graphs) and
the reference. "onnxruntime" runs the graph `edgellm export` wrote (export/), through
ExportedSteps (exported_steps.py here): the same prefill_step / decode_step interface, the runner's
own KV cache, logits and input tensors bound to the engine by data pointer, so a step copies nothing
between torch and the engine (the KV cache is updated in place).
"""

from __future__ import annotations

from ...errors import BackendError

BACKENDS = ("triton", "onnxruntime")


def check_backend(backend) -> str:
    if backend not in BACKENDS:
        hint = " (a TensorRT engine is a trial outside the package: it has never run)" if backend == "tensorrt" else ""
        raise BackendError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}{hint}")
    return backend

