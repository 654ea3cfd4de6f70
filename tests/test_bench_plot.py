"""`edgellm bench --plot` (edgellm/bench_plot.py): saved results of both formats drawn, the series
each panel gets, and clear errors (no matplotlib, unreadable or foreign JSON, --from without --plot)."""

import json
import sys

import pytest

from edgellm.bench_plot import decode_series, load_results, plot_decode
from edgellm.cli import main
from edgellm.errors import ConfigurationError

OURS = {"model": "smollm2-135m", "decode": [
    {"batch": 1, "mode": "chain", "tokens_per_s": 1410.0, "floor_ms": 0.091},
    {"batch": 16, "mode": "chain", "tokens_per_s": 16800.0, "floor_ms": 0.095},
    {"batch": 1, "mode": "persistent", "tokens_per_s": 1623.0, "floor_ms": 0.091}], "ttft": []}
DECODE_PY = {"meta": {"device": "H100"}, "results": [{
    "shape": "llama-3.2-1b",
    "edgellm": {"model": "llama-3.2-1b", "decode": [{"batch": 1, "tokens_per_s": 848.0, "floor_ms": 0.84},
                                                     {"batch": 4, "tokens_per_s": 3300.0, "floor_ms": 0.85}]},
    "torch_compile_reference": {"decode": [{"batch": 1, "tokens_per_s": 560.0}]}}]}


def test_series_of_both_formats():
    name, series = decode_series(OURS)
    assert name == "smollm2-135m"
    assert series["chain"] == [(1, 1410.0), (16, 16800.0)] and series["persistent"] == [(1, 1623.0)]
    assert series["bandwidth floor"][0] == (1, pytest.approx(1 / 0.091 * 1e3))
    name, series = decode_series(DECODE_PY["results"][0])
    assert name == "llama-3.2-1b" and series["chain"] == [(1, 848.0), (4, 3300.0)]  # rows without a mode: the chain
    assert series["torch.compile reference"] == [(1, 560.0)]


def test_plot_from_saved_results(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    (tmp_path / "ours.json").write_text(json.dumps(OURS))
    (tmp_path / "decode.json").write_text(json.dumps(DECODE_PY))
    out = tmp_path / "decode.png"
    assert main(["bench", "--plot", str(out), "--from", str(tmp_path / "ours.json"), str(tmp_path / "decode.json")]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "smollm2-135m: chain, persistent, bandwidth floor" in printed
    assert "llama-3.2-1b: chain, torch.compile reference, bandwidth floor" in printed
    drawn = plot_decode(load_results([tmp_path / "ours.json"]), tmp_path / "again.svg")
    assert drawn == {"smollm2-135m": ["chain", "persistent", "bandwidth floor"]}
    assert (tmp_path / "again.svg").read_text().lstrip().startswith("<?xml")


def test_plot_errors(tmp_path, monkeypatch):
    (tmp_path / "other.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(ConfigurationError, match="no decode results"):
        load_results([tmp_path / "other.json"])
    with pytest.raises(ConfigurationError, match="cannot read"):
        load_results([tmp_path / "missing.json"])
    assert main(["bench", "--from", str(tmp_path / "other.json")]) != 0  # --from without --plot
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    with pytest.raises(ConfigurationError, match="matplotlib"):
        plot_decode([OURS], tmp_path / "x.png")


def test_bench_takes_a_quantization_and_refuses_what_does_not_fit(capsys):
    """`edgellm bench --quantization int4 [--quantize-lm-head]` times the packed engine (bench/quant.py's
    formats from the command line); the mismatches are told before any GPU work."""
    assert main(["bench", "--shape", "llama-3.1-8b", "--quantize-lm-head"]) != 0  # (the head alone: no format)
    assert "--quantize-lm-head needs --quantization" in capsys.readouterr().err
    assert main(["bench", "--backend", "triton", "--quantization", "int4"]) != 0
    assert "drop --backend" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--quantization", "int5"])
    assert "invalid choice: 'int5'" in capsys.readouterr().err

