"""A TensorRT engine built from an export's model.onnx, run on the runner's tensors (a trial: README.md here).

NEVER RUN: no TensorRT builder could be installed where this project is developed or on its GPU
machine, so this file has never executed; its test (test_tensorrt.py here) skips where `tensorrt`
does not import. It follows TensorRT 10's Python API:

- build: the ONNX parser reads model.onnx (its external weights beside it); two optimization
  profiles, prefill (1..max_batch rows of 1..max_input_length tokens) and decode (one token a row),
  both for the runner's whole KV cache (its max_batch + 1 slots and capacity, fixed shapes) and
  1..capacity attended positions; the network strongly typed, so the export's dtype is kept. The
  serialized engine is cached beside the export, named after those limits.
- run: one execution context per profile; `set_input_shape` and `set_tensor_address(name,
  tensor.data_ptr())` for every input and output, the KV cache's past and present bound to the same
  memory; `execute_async_v3` on torch's current stream (the runner captures decode steps in
  `torch.cuda.graph` around this call).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from edgellm.errors import BackendError

log = logging.getLogger("edgellm")


def _tensorrt():
    try:
        import tensorrt
    except ImportError as exc:
        raise BackendError(f"the tensorrt backend needs TensorRT's Python package ({exc}); install it "
                           "on a machine with the TensorRT libraries") from exc
    return tensorrt


class TensorRTEngine:
    name = "tensorrt"

    def __init__(self, export_dir: Path, description: dict, device: torch.device, limits: dict):
        trt = _tensorrt()
        if device.type != "cuda":
            raise BackendError("the tensorrt backend runs on CUDA devices only")
        self.trt, self.device, self.description, self.limits = trt, device, description, limits
        self.logger = trt.Logger(trt.Logger.WARNING)
        plan = Path(export_dir) / ("engine.b{max_batch_size}.s{max_input_length}.c{max_kv_cache_capacity}.plan"
                                   .format(**limits))
        if not plan.is_file():
            plan.write_bytes(self._build(Path(export_dir) / description["onnx"]))
        self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise BackendError(f"TensorRT could not deserialize {plan} (built by another TensorRT version? delete it)")
        self._check_profiles()
        stream = torch.cuda.current_stream(device).cuda_stream
        self.contexts = []
        for profile in range(2):
            context = self.engine.create_execution_context()
            context.set_optimization_profile_async(profile, stream)
            self.contexts.append(context)

    def _shapes(self, decode: bool) -> dict[str, tuple[tuple, tuple, tuple]]:
        """(min, opt, max) of each dynamic input, for one profile."""
        d, lim = self.description, self.limits
        rows, tokens, capacity = lim["max_batch_size"], lim["max_input_length"], lim["max_kv_cache_capacity"]
        hidden = d["model"]["hidden_size"]
        seq = (1, 1, 1) if decode else (1, max(1, tokens // 2), tokens)
        shapes = {"inputs_embeds": ((1, seq[0], hidden), (1, seq[1], hidden), (rows, seq[2], hidden)),
                  "kv_positions": ((1,), (capacity,), (capacity,))}
        for name in ("past_lengths", "context_lengths", "slots"):
            shapes[name] = ((1,), (1,), (rows,))
        cache = (2, rows + 1, d["model"]["num_kv_heads"], capacity, d["model"]["head_dim"])
        for layer in range(d["model"]["num_decoder_layers"]):
            shapes[f"past_key_values.{layer}"] = (cache, cache, cache)
        return shapes

    def _build(self, onnx_path: Path) -> bytes:
        trt = self.trt
        log.warning("building a TensorRT engine from %s for %s (once; cached beside it)", onnx_path, self.limits)
        builder = trt.Builder(self.logger)
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise BackendError(f"TensorRT's ONNX parser rejected {onnx_path}: {errors}")
        config = builder.create_builder_config()
        for decode in (False, True):
            profile = builder.create_optimization_profile()
            for name, (low, best, high) in self._shapes(decode).items():
                profile.set_shape(name, low, best, high)
            config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise BackendError(f"TensorRT could not build an engine from {onnx_path} (see its log above)")
        return bytes(serialized)

    def _check_profiles(self) -> None:
        """BackendError when the cached engine was built for other limits than the runner's."""
        for profile, decode in ((0, False), (1, True)):
            for name, (_, _, high) in self._shapes(decode).items():
                built = tuple(self.engine.get_tensor_profile_shape(name, profile)[2])
                if built != tuple(high):
                    raise BackendError(f"the TensorRT engine was built for {name} up to {built}; this runner needs "
                                       f"{tuple(high)} (build it again for these limits)")

    def run(self, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor], decode: bool = False) -> None:
        context = self.contexts[1 if decode else 0]
        for name, tensor in inputs.items():
            context.set_input_shape(name, tuple(tensor.shape))
            context.set_tensor_address(name, tensor.data_ptr())
        for name, tensor in outputs.items():
            context.set_tensor_address(name, tensor.data_ptr())
        if not context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise BackendError("TensorRT's execute_async_v3 failed (see its log above)")
