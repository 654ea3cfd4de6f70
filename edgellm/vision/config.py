"""A vision-language model directory's vision side: the encoder's shape, the image tokens of the
language model, and the image preprocessing (preprocessor_config.json), read once at load."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..errors import ModelLoadError, UnsupportedModelError
from .qwen_preprocess import QwenImageSettings

FAMILIES = ("qwen2_vl", "qwen2_5_vl")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    family: str              # "qwen2_vl" or "qwen2_5_vl"
    depth: int
    width: int               # the ViT's hidden size
    heads: int
    intermediate: int
    out_hidden: int          # the language model's hidden size (the merger's output)
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    in_channels: int
    activation: str          # "quick_gelu", "gelu", "gelu_tanh" (fc1/fc2 MLP) or "silu" (SwiGLU MLP)
    norm: str                # "layer_norm" or "rms_norm"
    norm_eps: float
    rope_theta: float
    window_size: int         # Qwen2.5-VL: window attention over window_size pixels (0: none)
    full_attention_blocks: tuple[int, ...]  # Qwen2.5-VL: the blocks that attend over the whole image
    image_token_id: int
    vision_start_id: int | None
    vision_end_id: int | None
    preprocess: QwenImageSettings

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def parameter_count(self) -> int:
        """Parameters of the encoder and merger (for the up-front memory check)."""
        w, i = self.width, self.intermediate
        mlp = (3 if self.activation == "silu" else 2) * w * i + 3 * i
        block = 4 * w * w + 4 * w + mlp + 4 * w
        merged = w * self.merge_size ** 2
        return self.patch_values * w + self.depth * block + merged * merged + merged * self.out_hidden + 2 * merged

    @property
    def patch_values(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2


def vision_config_of(model_dir: str | Path) -> VisionConfig | None:
    """The vision config of a VLM directory; None for a text-only model."""
    model_dir = Path(model_dir)
    try:
        hf = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {model_dir / 'config.json'}: {exc}") from exc
    family = hf.get("model_type")
    if family not in FAMILIES:
        if "vision_config" in hf:
            raise UnsupportedModelError(f"vision-language model_type {family!r} is not supported; supported: "
                                        f"{', '.join(FAMILIES)}")
        return None
    pre_path = model_dir / "preprocessor_config.json"
    try:
        pre = json.loads(pre_path.read_text()) if pre_path.is_file() else {}
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {pre_path}: {exc}") from exc
    try:
        return _qwen(hf, family, pre)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"config.json's vision_config is missing or has a bad value for {exc}") from exc


def _qwen(hf: dict, family: str, pre: dict) -> VisionConfig:
    v = hf["vision_config"]
    text = {**hf, **(hf.get("text_config") or {})}
    rope = v.get("rope_parameters") or {}
    if family == "qwen2_vl":
        width = int(v.get("embed_dim", 1280))
        shape = dict(width=width, intermediate=int(width * float(v.get("mlp_ratio", 4))),
                     out_hidden=int(v.get("hidden_size", text["hidden_size"])),
                     activation=v.get("hidden_act", "quick_gelu"), norm="layer_norm", window_size=0,
                     full_attention_blocks=())
    else:
        shape = dict(width=int(v["hidden_size"]), intermediate=int(v["intermediate_size"]),
                     out_hidden=int(v.get("out_hidden_size", text["hidden_size"])),
                     activation=v.get("hidden_act", "silu"), norm="rms_norm", window_size=int(v.get("window_size", 112)),
                     full_attention_blocks=tuple(int(i) for i in v.get("fullatt_block_indexes", ())))
    if shape["activation"] not in ("quick_gelu", "gelu", "gelu_tanh", "gelu_pytorch_tanh", "silu"):
        raise UnsupportedModelError(f"vision hidden_act {shape['activation']!r} is not supported")
    if shape["activation"] == "gelu_pytorch_tanh":
        shape["activation"] = "gelu_tanh"
    cfg = VisionConfig(
        family=family, depth=int(v["depth"]), heads=int(v["num_heads"]),
        patch_size=int(v.get("patch_size", 14)), temporal_patch_size=int(v.get("temporal_patch_size", 2)),
        merge_size=int(v.get("spatial_merge_size", 2)), in_channels=int(v.get("in_channels", v.get("in_chans", 3))),
        norm_eps=1e-6, rope_theta=float(rope.get("rope_theta", 10000.0)),
        image_token_id=int(text.get("image_token_id", 151655)),
        vision_start_id=text.get("vision_start_token_id"), vision_end_id=text.get("vision_end_token_id"),
        preprocess=QwenImageSettings.from_dict(pre, v), **shape)
    if cfg.width % cfg.heads or cfg.head_dim % 4:
        raise UnsupportedModelError(f"vision width {cfg.width} over {cfg.heads} heads: head_dim must be a multiple of 4")
    if cfg.preprocess.patch_size != cfg.patch_size or cfg.preprocess.merge_size != cfg.merge_size:
        raise ModelLoadError("preprocessor_config.json's patch / merge size disagrees with vision_config")
    return cfg
