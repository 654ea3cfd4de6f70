"""The engine's A/B switches (engine/switches.py): read from the environment once, when a runner is
built, checked there, and carried into its steps (the forward's fusion rules, the kernels' RunSettings)."""

import pytest

from edgellm import LLMEngineRunner
from edgellm.engine import model, state
from edgellm.engine.switches import Switches
from edgellm.errors import ConfigurationError
from edgellm.kernels.dispatch import run_settings

from conftest import build_model


def test_defaults_and_every_variable():
    assert Switches.from_environment({}) == Switches()
    env = {"EDGELLM_FUSED_GEMV": "0", "EDGELLM_FUSED_ROPE": "1", "EDGELLM_FUSED_NORM_ROWS": "16",
           "EDGELLM_GEMV_PREFETCH": "0", "EDGELLM_PDL": "early", "EDGELLM_RUN_AHEAD": "0",
           "EDGELLM_HAND_OVER": "0", "EDGELLM_FORBID_REF_ON_CUDA": "1", "EDGELLM_INT4_CODES": "f16",
           "EDGELLM_PACKED_OPERANDS": "weights", "EDGELLM_BYTE_CODES": "ptx", "EDGELLM_INT4_TILE": "128,128,4,3",
           "EDGELLM_GEMV_SPLIT": "auto", "EDGELLM_PACKED_ROW_DOTS": "1", "EDGELLM_PACKED_PREFILL": "gemm"}
    got = Switches.from_environment(env)
    assert got == Switches(fused_gemv=False, fused_rope=True, fused_norm_rows=16, gemv_prefetch=0, pdl="early",
                           run_ahead=False, hand_over=False, forbid_reference_on_cuda=True, int4_codes="f16",
                           packed_operands="weights", byte_codes="ptx", int4_tile=(128, 128, 4, 3),
                           gemv_split="auto", packed_row_dots=True, packed_prefill="gemm")
    assert got.run_settings() == {"pdl": "early", "gemv_prefetch": 0, "forbid_reference_on_cuda": True,
                                  "int4_codes": "f16", "byte_codes": "ptx",
                                  "packed_operands": "weights", "int4_tile": (128, 128, 4, 3), "gemv_split": "auto",
                                  "packed_row_dots": True, "packed_prefill": "gemm"}
    assert Switches().run_settings() == {}  # the defaults change nothing a debug block sets
    assert Switches.from_environment({"EDGELLM_PDL": "0"}).pdl == "off"
    assert Switches.from_environment({"EDGELLM_FUSED_ROPE": "0"}).fused_rope is False


@pytest.mark.parametrize("name,value", [("EDGELLM_FUSED_GEMV", "yes"), ("EDGELLM_PDL", "fast"),
                                        ("EDGELLM_FUSED_NORM_ROWS", "-1"), ("EDGELLM_GEMV_PREFETCH", "4k"),
                                        ("EDGELLM_INT4_CODES", "f8"), ("EDGELLM_PACKED_OPERANDS", "x"),
                                        ("EDGELLM_BYTE_CODES", "f16"), ("EDGELLM_INT4_TILE", "128,128,4"),
                                        ("EDGELLM_BYTE_TILE", "96,256,4,3"), ("EDGELLM_GEMV_SPLIT", "on"),
                                        ("EDGELLM_PACKED_PREFILL", "int4")])
def test_a_bad_value_names_its_variable(name, value):
    with pytest.raises(ConfigurationError, match=name):
        Switches.from_environment({name: value})


def test_a_runner_reads_them_once_and_its_steps_run_under_them(tmp_path, monkeypatch):
    build_model("llama", tmp_path)
    monkeypatch.setenv("EDGELLM_PDL", "fast")
    with pytest.raises(ConfigurationError, match="EDGELLM_PDL"):  # before anything loads
        LLMEngineRunner(tmp_path, device="cpu")
    monkeypatch.setenv("EDGELLM_PDL", "late")
    monkeypatch.setenv("EDGELLM_GEMV_PREFETCH", "1024")
    runner = LLMEngineRunner(tmp_path, device="cpu", cuda_graphs=False)
    monkeypatch.setenv("EDGELLM_PDL", "0")  # later changes reach no built runner
    assert (runner.switches.pdl, runner.switches.gemv_prefetch) == ("late", 1024)
    seen = []
    forward = state.forward_logits

    def observed(*args, **kwargs):
        seen.append((run_settings().pdl, run_settings().gemv_prefetch, kwargs["switches"]))
        return forward(*args, **kwargs)

    monkeypatch.setattr(state, "forward_logits", observed)
    logits = runner.prefill_tokens([[1, 5, 9]])
    runner.decode_step(runner.embed(logits.argmax(-1)[:, None]))
    assert seen == [("late", 1024, runner.switches)] * 2
    assert run_settings().pdl == "on"  # outside a step: the defaults again


def test_the_fusion_rules_follow_the_switches(tmp_path):
    build_model("llama", tmp_path)
    runner = LLMEngineRunner(tmp_path, device="cpu", cuda_graphs=False)
    cfg, rope = runner.config, runner.rope
    small, large = 1 << 10, 1 << 30  # qkv weight bytes: the measured rule fuses one row's RoPE only past 4 MB
    assert not model._rope_fusable(cfg, rope, 0, None, None, 1, small, None)
    assert model._rope_fusable(cfg, rope, 0, None, None, 1, large, None)
    assert model._rope_fusable(cfg, rope, 0, None, None, 1, small, True)
    assert model._rope_fusable(cfg, rope, 0, None, None, 1, small, None, invariant=True)  # (one way at any batch)
    assert not model._rope_fusable(cfg, rope, 0, None, None, 4, large, False)
