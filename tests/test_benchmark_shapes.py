"""The named random-weight shapes of edgellm.benchmark: each parses as an engine config, the 8B one has
Llama-3.1-8B's parameter count, and layer_matrices (what bench/quant.py times the GEMV on) names the
matrices the engine loads."""

import math

import pytest

from edgellm.benchmark import SHAPES, layer_matrices
from edgellm.engine.config import EngineConfig
from edgellm.engine.weights import expected_shapes


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_every_shape_is_an_engine_config(shape):
    cfg = EngineConfig.from_hf_dict(SHAPES[shape])
    assert cfg.vocab_size == SHAPES[shape]["vocab_size"] and expected_shapes(cfg)


def test_the_8b_shape_has_llama_3_1_8b_parameters():
    shapes = expected_shapes(EngineConfig.from_hf_dict(SHAPES["llama-3.1-8b"]))
    assert sum(math.prod(s) for s in shapes.values()) == 8_030_261_248  # (untied: its LM head is its own)


@pytest.mark.parametrize("shape", ["llama-3.2-1b", "llama-3.1-8b", "smollm2-135m"])
def test_layer_matrices_are_the_loaded_ones(shape):
    shapes = expected_shapes(EngineConfig.from_hf_dict(SHAPES[shape]))
    layer = {name.split(".")[-2]: tuple(s) for name, s in shapes.items() if name.startswith("model.layers.0.")}
    n_q, hidden = layer["q_proj"]
    wanted = {"qkv": (n_q + 2 * layer["k_proj"][0], hidden), "o": layer["o_proj"],
              "gate_up": (2 * layer["gate_proj"][0], hidden), "down": layer["down_proj"],
              "lm_head": tuple(shapes.get("lm_head.weight", shapes["model.embed_tokens.weight"]))}
    assert layer_matrices(shape) == wanted
