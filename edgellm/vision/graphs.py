"""CUDA graphs of a vision tower's forward.

At one image of ordinary size the encoder is bound by the host: hundreds of kernels, each paying
Python and Triton launch cost (measured on the H100: Qwen2.5-VL-3B at 448x448 ran 5 ms of kernels in
20 ms). A graph per input shape (the images' patch grids, or InternVL's tile count) replays them in
one launch. A shape is captured the second time it is seen (a one-off size is not worth a capture),
only up to `max_patches` (beyond that the GPU, not the host, is the bottleneck, and a graph's
activations would hold more memory), and the `slots` most recently used shapes are kept. All graphs
share one memory pool, replayed one at a time, so the pool holds about one forward's activations
(VisionConfig.graph_bytes) plus each kept graph's inputs and output.
"""

from __future__ import annotations

import collections
import dataclasses

import torch

from ..engine.graphs import StepGraphs

GRAPH_MAX_PATCHES = 2560  # Qwen up to ~700x700 pixels; InternVL up to two 448 tiles
GRAPH_SLOTS = 8
CAPTURE_AFTER_USES = 2


@dataclasses.dataclass
class _Entry:
    inputs: list[torch.Tensor]   # static device copies of the host pixels
    layout: object               # the tower's layout, captured with the graph
    output: torch.Tensor


class EncoderGraphs:
    def __init__(self, tower, device: torch.device, enabled: bool = True, *, max_patches: int = GRAPH_MAX_PATCHES,
                 slots: int = GRAPH_SLOTS, after_uses: int = CAPTURE_AFTER_USES):
        self.tower, self.device = tower, device
        self.graphs = StepGraphs(device, enabled=enabled)
        self.max_patches, self.slots, self.after_uses = max_patches, slots, after_uses
        self._entries: collections.OrderedDict[tuple, _Entry] = collections.OrderedDict()
        self._uses: dict[tuple, int] = {}
        self.replays = 0  # for tests and stats

    @property
    def enabled(self) -> bool:
        return self.graphs.enabled

    def run(self, images) -> torch.Tensor | None:
        """The tower's output for these images from a graph (a fresh tensor), or None: run it eagerly."""
        if not self.graphs.enabled or self.tower.patches(images) > self.max_patches:
            return None
        key = self.tower.graph_key(images)
        entry = self._entries.get(key)
        if entry is None:
            if len(self._uses) > 1024:  # shapes seen once long ago: forget them
                self._uses.clear()
            self._uses[key] = self._uses.get(key, 0) + 1
            if self._uses[key] < self.after_uses:
                return None
            entry = self._capture(key, images)
        self._entries.move_to_end(key)
        for static, host in zip(entry.inputs, self.tower.host_tensors(images)):
            static.copy_(host)
        self.graphs.graphs[key].replay()
        self.replays += 1
        return entry.output.clone()

    def _capture(self, key: tuple, images) -> _Entry:
        inputs = [t.to(self.device) for t in self.tower.host_tensors(images)]
        layout = self.tower.layout(images)
        holder = {}

        def step():
            holder["output"] = self.tower.compute(inputs, layout)

        self.graphs.capture(key, step)
        entry = self._entries[key] = _Entry(inputs, layout, holder["output"])
        while len(self._entries) > self.slots:
            old, _ = self._entries.popitem(last=False)
            self.graphs.graphs.pop(old, None)
        return entry
