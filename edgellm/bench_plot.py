"""`edgellm bench --plot out.png`: decode tokens/s per batch size against the bandwidth floor and the
torch.compile baseline where a result has it (bench/decode.py's JSON). matplotlib is an optional
extra (`pip install matplotlib`).

Takes the results of `edgellm bench` (one dict per model: decode rows with batch, tokens_per_s,
floor_ms; rows of older results may name a mode, drawn as series of their own) or of bench/decode.py
(meta + results, each with "edgellm" and "torch_compile_reference").
"""

from __future__ import annotations

from pathlib import Path

from .errors import ConfigurationError, read_json


def decode_series(result: dict) -> tuple[str, dict[str, list[tuple[int, float]]]]:
    """(model name, {series label: [(batch, tokens/s), ...]}) of one model's result, either format."""
    ours = result.get("edgellm", result)
    name = result.get("shape") or ours.get("model") or "model"
    series: dict[str, list[tuple[int, float]]] = {}
    floor = {}
    for row in ours.get("decode", []):
        series.setdefault(row.get("mode", "chain"), []).append((row["batch"], row["tokens_per_s"]))
        if row.get("floor_ms"):
            floor[row["batch"]] = row["batch"] / row["floor_ms"] * 1e3
    compiled = result.get("torch_compile_reference", {}).get("decode", [])
    if compiled:
        series["torch.compile reference"] = [(r["batch"], r["tokens_per_s"]) for r in compiled]
    if floor:
        series["bandwidth floor"] = sorted(floor.items())
    return name, {label: sorted(points) for label, points in series.items()}


def load_results(paths) -> list[dict]:
    """Model results from JSON files of either format."""
    results = []
    for path in paths:
        data = read_json(path, ConfigurationError, " (benchmark results)")
        entries = data["results"] if isinstance(data, dict) and "results" in data else [data]
        if not all(isinstance(e, dict) and ("decode" in e or "edgellm" in e) for e in entries):
            raise ConfigurationError(f"{path} holds no decode results (edgellm bench --json or bench/decode.py --json)")
        results.extend(entries)
    return results


STYLES = {"chain": dict(marker="o"),
          "torch.compile reference": dict(marker="s", linestyle="--"),
          "bandwidth floor": dict(color="gray", linestyle=":")}


def plot_decode(results: list[dict], path: str | Path) -> dict[str, list[str]]:
    """Draws one panel per model (log-log: tokens/s against batch size) into `path` (PNG, or any
    format matplotlib knows by the suffix). Returns {model: the series drawn}."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ConfigurationError("--plot needs matplotlib: pip install matplotlib (the plot extra)") from exc
    if not results:
        raise ConfigurationError("nothing to plot: no decode results")
    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.2), squeeze=False)
    drawn = {}
    for ax, result in zip(axes[0], results):
        name, series = decode_series(result)
        for label, points in series.items():
            ax.plot([b for b, _ in points], [t for _, t in points], label=label, **STYLES.get(label, {}))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel("decode tokens/s")
        ax.set_title(name)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
        drawn[name] = list(series)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn
