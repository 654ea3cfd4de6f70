#!/usr/bin/env bash
# The device script: GPU tests (kernels vs their references on CUDA, end-to-end generation vs
# transformers, CUDA-graph decode vs eager, no reference op in the hot path), then the kernel and
# decode benchmarks; short tables last.
# Usage on the GPU machine, from the repository root:  EDGELLM_COMMIT=<sha> bash bench/gpu_check.sh [tests|tests1|tests2|kernels|decode|lora|kv|threads|serving|http|ttft|processing|structured|determinism|vision|vocab|families|quant|quant8b|packed|packed8b|host|backends ...]
# (no argument: all of them). Results go to $OUT (the device tool's folder) or bench/results.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-bench/results}"
mkdir -p "$out"
parts="${*:-tests kernels decode lora kv threads vision vocab families quant host backends}"
status=0
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
# The GPU tests in two halves, selected by directory and marker (each inside the device tool's
# 10-minute call on a fresh machine): tests1, every kernel test (tests/kernels: on a GPU each runs the
# compiled kernels on CUDA tensors); tests2, every other test marked gpu (pyproject.toml's markers).
# "tests": both, one after the other.
[[ " $parts " == *" tests "* ]] && parts="$parts tests1 tests2"
for half in tests1 tests2; do
  [[ " $parts " == *" $half "* ]] || continue
  if [[ $half == tests1 ]]; then selection=(tests/kernels); else selection=(-m gpu --ignore=tests/kernels tests); fi
  python3 -m pytest -q -rP -p no:cacheprovider "${selection[@]}" > "$out/gpu_pytest_$half.log" 2>&1
  result=$?
  [ $result -ne 0 ] && status=$result
  echo "$half: $(grep -E "passed|failed|error" "$out/gpu_pytest_$half.log" | tail -1)"
  grep -E "^memory plan" "$out/gpu_pytest_$half.log"  # test_memory_plan_bounds_what_the_engine_uses
  [ $result -ne 0 ] && grep -E "^(FAILED|ERROR)" "$out/gpu_pytest_$half.log" | head -20
done
if [[ " $parts " == *" kernels "* ]]; then
  python3 bench/kernels.py --json "$out/kernels.json" 2> "$out/kernels.stderr"
fi
if [[ " $parts " == *" decode "* ]]; then
  python3 bench/decode.py --json "$out/decode.json" 2> "$out/decode.stderr" || { status=1; tail -30 "$out/decode.stderr"; }
fi
if [[ " $parts " == *" lora "* ]]; then
  python3 bench/lora.py --json "$out/lora.json" 2> "$out/lora.stderr" || { status=1; tail -30 "$out/lora.stderr"; }
fi
if [[ " $parts " == *" kv "* ]]; then
  python3 bench/kv_reuse.py --json "$out/kv_reuse.json" 2> "$out/kv_reuse.stderr" || { status=1; tail -30 "$out/kv_reuse.stderr"; }
fi
if [[ " $parts " == *" vision "* ]]; then
  python3 bench/vision.py --json "$out/vision.json" 2> "$out/vision.stderr" || { status=1; tail -30 "$out/vision.stderr"; }
fi
if [[ " $parts " == *" vocab "* ]]; then
  python3 bench/vocab.py --json "$out/vocab.json" 2> "$out/vocab.stderr" || { status=1; tail -30 "$out/vocab.stderr"; }
fi
if [[ " $parts " == *" families "* ]]; then
  python3 bench/families.py --json "$out/families.json" 2> "$out/families.stderr" || { status=1; tail -30 "$out/families.stderr"; }
fi
if [[ " $parts " == *" quant "* ]]; then
  python3 bench/quant.py --sweep none --lm-head --batch 1 16 32 64 --json "$out/quant.json" 2> "$out/quant.stderr" \
    || { status=1; tail -30 "$out/quant.stderr"; }
  # (the A/B of the codes' unpacking in PTX: decode rows only, the engine reads the switches)
  EDGELLM_INT4_CODES=ptx EDGELLM_BYTE_CODES=ptx python3 bench/quant.py --skip kernel --lm-head --batch 1 16 32 64 \
    --json "$out/quant_ptx.json" 2> "$out/quant_ptx.stderr" || { status=1; tail -30 "$out/quant_ptx.stderr"; }
  # (and with bench/packed_gemv.py's wider tiles, K split to fill the SMs, one row on the tensor cores, int4
  # prefill read packed: its TTFT rows)
  EDGELLM_INT4_CODES=words-ptx EDGELLM_BYTE_CODES=ptx EDGELLM_INT4_TILE=128,128,4,3 EDGELLM_BYTE_TILE=64,256,4,3 \
    EDGELLM_GEMV_SPLIT=auto EDGELLM_PACKED_ROW_DOTS=1 EDGELLM_PACKED_PREFILL=gemm python3 bench/quant.py --skip kernel --kinds int8 int4 fp8 \
    --lm-head --batch 1 16 32 64 --json "$out/quant_ptx_wide.json" 2> "$out/quant_ptx_wide.stderr" \
    || { status=1; tail -30 "$out/quant_ptx_wide.stderr"; }
fi
if [[ " $parts " == *" quant8b "* ]]; then  # (the 8B shape: 16 GB of random weights written once, ~1-2 min)
  python3 bench/quant.py --shape llama-3.1-8b --sweep none --lm-head --batch 1 16 --json "$out/quant8b.json" \
    2> "$out/quant8b.stderr" || { status=1; tail -30 "$out/quant8b.stderr"; }
  EDGELLM_INT4_CODES=words-ptx EDGELLM_BYTE_CODES=ptx EDGELLM_INT4_TILE=128,128,4,3 EDGELLM_BYTE_TILE=64,256,4,3 \
    EDGELLM_GEMV_SPLIT=auto EDGELLM_PACKED_ROW_DOTS=1 EDGELLM_PACKED_PREFILL=gemm python3 bench/quant.py --shape llama-3.1-8b --skip kernel \
    --kinds int8 int4 fp8 --lm-head --batch 1 16 --json "$out/quant8b_ptx_wide.json" 2> "$out/quant8b_ptx_wide.stderr" \
    || { status=1; tail -30 "$out/quant8b_ptx_wide.stderr"; }
fi
if [[ " $parts " == *" packed "* ]]; then  # (the packed-weight GEMV's variants at 1, 16 and 64 rows, 1B shape: ~5 min)
  # (first the compiled kernels against their references: the PTX codes' bits, split-K's order)
  python3 -m pytest -q -p no:cacheprovider tests/kernels/test_gemv.py tests/kernels/test_gemv_split_k.py \
    tests/kernels/test_matmul_int4.py tests/quant/test_quant_gpu.py \
    > "$out/packed_pytest.log" 2>&1 || { status=1; grep -E "^(FAILED|ERROR)" "$out/packed_pytest.log" | head -20; }
  echo "packed GEMV GPU tests: $(grep -E "passed|failed|error" "$out/packed_pytest.log" | tail -1)"
  python3 bench/packed_gemv.py --shape llama-3.2-1b --json "$out/packed_gemv_llama-3.2-1b.json" \
    2> "$out/packed_gemv_llama-3.2-1b.stderr" || { status=1; tail -30 "$out/packed_gemv_llama-3.2-1b.stderr"; }
fi
if [[ " $parts " == *" packed8b "* ]]; then  # (the same on the 8B shape's matrices: ~5 min)
  python3 bench/packed_gemv.py --shape llama-3.1-8b --json "$out/packed_gemv_llama-3.1-8b.json" \
    2> "$out/packed_gemv_llama-3.1-8b.stderr" || { status=1; tail -30 "$out/packed_gemv_llama-3.1-8b.stderr"; }
fi
if [[ " $parts " == *" host "* ]]; then
  python3 bench/host_loop.py --json "$out/host_loop.json" 2> "$out/host_loop.stderr" || { status=1; tail -30 "$out/host_loop.stderr"; }
fi
if [[ " $parts " == *" backends "* ]]; then
  # ONNX export and the exported backends (onnxruntime; TensorRT where it imports), then the side-by-side
  # table at fp16 (onnxruntime on the CPU without onnxruntime-gpu, from a float32 export) and fp32. For the CUDA
  # execution provider, carry onnxruntime-gpu and put it first on PYTHONPATH (bench/RESULTS.md, 2026-12-06, says how).
  python3 -m pytest -q -rs -p no:cacheprovider tests/export > "$out/backends_pytest.log" 2>&1 \
    || { status=1; grep -E "^(FAILED|ERROR)" "$out/backends_pytest.log" | head; }
  grep -E "passed|failed|SKIPPED" "$out/backends_pytest.log" | tail -6
  for dtype in float16 float32; do
    python3 -m edgellm.cli bench --backend triton onnxruntime tensorrt transformers --shape smollm2-135m \
      --dtype $dtype --isl 128 --osl 64 --json "$out/backends_$dtype.json" 2> "$out/backends_$dtype.stderr" \
      || { status=1; tail -30 "$out/backends_$dtype.stderr"; }
  done
fi
if [[ " $parts " == *" serving "* ]]; then
  python3 bench/serving.py --prefill-budget 512 256 128 --separate-prefill --json "$out/serving.json" 2> "$out/serving.stderr" || { status=1; tail -30 "$out/serving.stderr"; }
fi
if [[ " $parts " == *" processing "* ]]; then
  python3 bench/logit_processing.py --json "$out/logit_processing.json" 2> "$out/logit_processing.stderr" \
    || { status=1; tail -30 "$out/logit_processing.stderr"; }
fi
if [[ " $parts " == *" structured "* ]]; then
  # XGrammar and jsonschema are not on the device: carry .whl/ (bench/RESULTS.md, structured output, says which wheels).
  python3 -c "import xgrammar, jsonschema" 2>/dev/null || python3 -m pip install -q --no-deps .whl/*.whl
  python3 -m pytest -q -p no:cacheprovider tests/grammar/test_structured_output_gpu.py > "$out/structured_pytest.log" 2>&1 \
    || { status=1; tail -30 "$out/structured_pytest.log"; }
  echo "structured GPU test: $(grep -E "passed|failed|error" "$out/structured_pytest.log" | tail -1)"
  python3 bench/structured_decode.py --json "$out/structured_decode.json" 2> "$out/structured_decode.stderr" \
    || { status=1; tail -30 "$out/structured_decode.stderr"; }
fi
if [[ " $parts " == *" http "* ]]; then
  # The serve extra is not on the device: carry .whl/ (README's Serve section and bench/RESULTS.md say which wheels).
  python3 -c "import fastapi, uvicorn" 2>/dev/null || python3 -m pip install -q --no-deps .whl/*.whl
  python3 bench/serving.py --http --json "$out/serving_http.json" 2> "$out/serving_http.stderr" \
    || { status=1; tail -30 "$out/serving_http.stderr"; }
fi
if [[ " $parts " == *" ttft "* ]]; then  # (the server's added TTFT at one client alone: ~1 min)
  python3 -c "import fastapi, uvicorn" 2>/dev/null || python3 -m pip install -q --no-deps .whl/*.whl
  python3 bench/serving_ttft.py --json "$out/serving_ttft.json" 2> "$out/serving_ttft.stderr" \
    || { status=1; tail -30 "$out/serving_ttft.stderr"; }
fi
if [[ " $parts " == *" determinism "* ]]; then  # (batch invariance: its tests, then decode with it off and on)
  # (the real default model's tests skip, saying so, unless its GGUF was carried: bench/RESULTS.md, 2026-12-08)
  python3 -m pytest -q -rs -p no:cacheprovider tests/engine/test_batch_invariance_gpu.py tests/kernels/test_batch_invariance.py \
    > "$out/determinism_pytest.log" 2>&1 || { status=1; grep -E "^(FAILED|ERROR)|Error" "$out/determinism_pytest.log" | head -20; }
  echo "determinism GPU tests: $(grep -E "passed|failed|error" "$out/determinism_pytest.log" | tail -1)"
  grep -E "^SKIPPED" "$out/determinism_pytest.log"
  for invariant in 0 1; do
    EDGELLM_BATCH_INVARIANT=$invariant python3 bench/decode.py --batch 1 16 --ttft 128 1024 --no-baselines \
      --json "$out/decode_invariant$invariant.json" 2> "$out/decode_invariant$invariant.stderr" \
      || { status=1; tail -30 "$out/decode_invariant$invariant.stderr"; }
    EDGELLM_BATCH_INVARIANT=$invariant python3 bench/serving.py --clients 16 --json "$out/serving_invariant$invariant.json" \
      2> "$out/serving_invariant$invariant.stderr" || { status=1; tail -30 "$out/serving_invariant$invariant.stderr"; }
  done
fi
if [[ " $parts " == *" threads "* ]]; then
  python3 bench/threads.py --json "$out/threads.json" 2> "$out/threads.stderr" || { status=1; tail -30 "$out/threads.stderr"; }
fi
exit $status
