"""TensorRTSteps: the exported backend's steps (edgellm/engine/backends/exported_steps.py) with a
TensorRT engine (tensorrt_engine.py here) instead of onnxruntime, and decode steps replayed from one
CUDA graph per batch size around execute_async_v3. A trial that has never run (README.md here)."""

from __future__ import annotations

import torch

from edgellm.engine.backends.exported_steps import ExportedSteps
from tensorrt_engine import TensorRTEngine


class TensorRTSteps(ExportedSteps):
    def __init__(self, export_dir, *, cuda_graphs: bool = True, **kwargs):
        super().__init__(export_dir, "tensorrt", **kwargs)
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self._graphs: dict[int, tuple] = {}  # batch -> (graph, static inputs)

    def _open_engine(self, description: dict, limits: dict):
        return TensorRTEngine(self.model_dir, description, self.device, limits)

    def _run_decode(self, embeds, past, context, slot_ids) -> torch.Tensor:
        """Static inputs, every capacity position attended (masked), so one capture serves every step."""
        if not self.cuda_graphs:
            return super()._run_decode(embeds, past, context, slot_ids)
        batch = embeds.shape[0]
        if batch not in self._graphs:
            static = (torch.zeros_like(embeds), self._int32(past, context, slot_ids))
            bindings = self._bindings(*static, self.config.max_kv_cache_capacity)
            self.engine.run(*bindings, decode=True)  # once before capture (TensorRT sets itself up on a first run)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.engine.run(*bindings, decode=True)
            self._graphs[batch] = (graph, static)
        graph, (static_embeds, static_ints) = self._graphs[batch]
        static_embeds.copy_(embeds)
        static_ints.copy_(torch.tensor([past, context, slot_ids], dtype=torch.int32), non_blocking=True)
        graph.replay()
        return static_ints
