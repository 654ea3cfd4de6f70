"""What one CPU decode step's matmuls cost (the default model's shapes: 30 layers of qkv, o, gate/up and
down, then the LM head; float32, one row), by who runs them: torch's linear (MKL), numpy's BLAS
(OpenBLAS) over the weights as stored [out, in] and stored [in, out] (engine/cpu_forward.py stores the
wide ones so), and onnxruntime's MatMul (MLAS) where it is installed. Rounds interleave the runners;
medians. Beside them, a copy of as many bytes between two preallocated tensors (each byte read once and
written once: a floor's neighbourhood, not the floor).

Run:  python bench/cpu_gemv.py [--rounds 15] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HIDDEN, INNER, LAYERS, VOCAB = 576, 1536, 30, 49152
SHAPES = [(960, HIDDEN), (HIDDEN, HIDDEN), (2 * INNER, HIDDEN), (HIDDEN, INNER)] * LAYERS + [(VOCAB, HIDDEN)]


def onnxruntime_step(weights: list[np.ndarray], inputs: dict):
    """A graph of one MatMul per weight (stored [in, out], as ONNX's MatMul takes it), or None."""
    try:
        import onnx
        import onnxruntime
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return None
    nodes, initializers, outputs = [], [], []
    for i, w in enumerate(weights):
        initializers.append(numpy_helper.from_array(np.ascontiguousarray(w.T), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [f"x{w.shape[1]}", f"w{i}"], [f"y{i}"]))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, w.shape[0]]))
    graph_inputs = [helper.make_tensor_value_info(f"x{n}", TensorProto.FLOAT, [1, n]) for n in inputs]
    graph = helper.make_graph(nodes, "step", graph_inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = Path(tempfile.mkdtemp()) / "step.onnx"
    onnx.save(model, str(path), save_as_external_data=True)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # (its idle threads would take the
    # cores from the runner after it in a round)
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {f"x{n}": x for n, x in inputs.items()}
    return lambda: session.run(None, feed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    generator = np.random.default_rng(0)
    weights = [(generator.standard_normal(shape) * 0.02).astype(np.float32) for shape in SHAPES]
    wide_stored = [np.ascontiguousarray(w.T).T if w.shape[0] >= w.shape[1] else w for w in weights]
    inputs = {n: generator.standard_normal((1, n)).astype(np.float32) for n in (HIDDEN, INNER)}
    tensors = [torch.from_numpy(w) for w in weights]
    torch_inputs = {n: torch.from_numpy(x) for n, x in inputs.items()}
    runs = {
        "torch F.linear": lambda: [F.linear(torch_inputs[w.shape[1]], w) for w in tensors],
        "numpy, as stored": lambda: [inputs[w.shape[1]] @ w.T for w in weights],
        "numpy, wide ones [in, out]": lambda: [inputs[w.shape[1]] @ w.T for w in wide_stored],
    }
    ort = onnxruntime_step(weights, inputs)
    if ort is not None:
        runs["onnxruntime MatMul"] = ort
    source, target = (torch.ones(sum(w.size for w in weights)) for _ in range(2))
    runs["copy of the weights' bytes"] = lambda: target.copy_(source)
    for fn in runs.values():
        fn()
    times = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, fn in runs.items():
            began = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - began)
    nbytes = sum(w.nbytes for w in weights)
    result = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    print(f"one decode step's matmuls ({nbytes / 1e6:.0f} MB float32, {torch.get_num_threads()} threads)")
    for name, ms in result.items():
        print(f"  {name:28s} {ms:7.1f} ms  {nbytes / ms / 1e6:5.1f} GB/s")
    if args.json:
        args.json.write_text(json.dumps(dict(mbytes=nbytes / 1e6, threads=torch.get_num_threads(), ms=result),
                                        indent=2) + "\n")


if __name__ == "__main__":
    main()
