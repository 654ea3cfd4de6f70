"""The GEMV compiled for Hopper (sm_90) on this machine, no GPU needed: every variant its switches select
(int4 / int8 / fp8 codes in PTX or Triton ops, either operand order, split-K with the epilogues it must
keep, one row on the CUDA cores) compiles, and its K loop issues what it was written to (the tensor-core
MMA it targets; no conversion instruction where the codes are made from their bits; Hopper's fp8
conversion where asked). The interpreter runs none of the PTX and checks no return types, so this is
what CI can know of the compiled kernels (bench/sass_gemv.py --check, in a process without the
interpreter)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _ptxas() -> bool:
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return bundled.exists() or shutil.which("ptxas") is not None


@pytest.mark.skipif(not _ptxas(), reason="this triton has no ptxas to compile for sm_90 with")
def test_every_gemv_variant_compiles_for_hopper_as_written():
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "sass_gemv.py"), "--check"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    report = done.stdout + done.stderr[-3000:]
    assert done.returncode == 0, report
    assert "variants compile for sm_90 as written" in done.stdout, report
