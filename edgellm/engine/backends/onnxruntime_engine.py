"""The onnxruntime backend: an InferenceSession over an export's model.onnx, its inputs and outputs
bound to torch tensors by data pointer through IOBinding.

Each step binds the runner's tensors where they lie (`bind_input` / `bind_output` with the tensor's
data_ptr(), shape and element type): nothing is copied into or out of onnxruntime. The KV cache
input of each layer and its updated ("present") output are bound to the same memory, so the graph's
ScatterND updates the runner's cache in place (onnxruntime skips ScatterND's copy of its input when
input and output are one buffer). On CPU tensors the CPU execution provider runs; on CUDA tensors
the CUDA one where onnxruntime-gpu is installed, on the torch stream that was current when the
engine was opened (onnxruntime takes one stream per session).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...errors import BackendError, ModelLoadError

_NUMPY_TYPES = {torch.float32: "float32", torch.float16: "float16", torch.int32: "int32", torch.int64: "int64"}
_ONNX_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "bfloat16": "tensor(bfloat16)",
               "int32": "tensor(int32)"}


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:
        raise BackendError(f"the onnxruntime backend needs the onnxruntime package ({exc}); install the onnx "
                           "extra: pip install -e \".[onnx]\" in a checkout (onnxruntime-gpu for CUDA tensors)") from exc
    return onnxruntime


class OnnxRuntimeEngine:
    name = "onnxruntime"

    def __init__(self, export_dir: Path, description: dict, device: torch.device):
        import numpy as np

        ort = _onnxruntime()
        if description["dtype"] == "bfloat16":
            raise BackendError("the onnxruntime backend runs float32 or float16 exports; this one is bfloat16")
        self.device = device
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: its graph-optimisation notes are not the user's business
        if device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BackendError("this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu), so it "
                                   "cannot run on CUDA tensors; use device='cpu'")
            # use_tf32 off: a float32 export computes in float32, as torch's matmuls and the triton
            # engine's dots do by default (the CUDA provider's default, TF32, moved logits by ~4e-3).
            providers = [("CUDAExecutionProvider", {
                "device_id": device.index or 0, "use_tf32": "0",
                "user_compute_stream": str(torch.cuda.current_stream(device).cuda_stream)})]
            # Its kernels' creation-time warnings (ScatterND's note on duplicate indices: the graph's
            # duplicates, padding rows, write equal values) go to the process-wide logger; errors only.
            ort.set_default_logger_severity(3)
        else:
            providers = ["CPUExecutionProvider"]
        path = Path(export_dir) / description["onnx"]
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # onnxruntime's load errors have no common base class
            raise ModelLoadError(f"onnxruntime cannot load {path}: {exc}") from exc
        graph = {v.name: v.type for v in (*self.session.get_inputs(), *self.session.get_outputs())}
        wanted = {v["name"]: _ONNX_TYPES[v["dtype"]] for v in (*description["inputs"], *description["outputs"])}
        if graph != wanted:
            raise ModelLoadError(f"{path}'s inputs and outputs do not match its edgellm_engine.json")
        self._types = {t: getattr(np, name) for t, name in _NUMPY_TYPES.items()}
        self.bound: dict[str, int] = {}  # name -> data pointer bound at the last step (tests read it)

    def run(self, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor], decode: bool = False) -> None:
        """One step: every tensor bound where it lies; outputs written in place."""
        binding = self.session.io_binding()
        kind, index = self.device.type, self.device.index or 0
        for name, tensor in inputs.items():
            binding.bind_input(name, kind, index, self._types[tensor.dtype], list(tensor.shape), tensor.data_ptr())
        for name, tensor in outputs.items():
            binding.bind_output(name, kind, index, self._types[tensor.dtype], list(tensor.shape), tensor.data_ptr())
        self.session.run_with_iobinding(binding)
        self.bound = {name: t.data_ptr() for name, t in (*inputs.items(), *outputs.items())}
