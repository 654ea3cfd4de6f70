"""A vision-language model directory's vision side: the encoder's shape, the image tokens of the
language model, and the image preprocessing (preprocessor_config.json), read once at load."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..errors import ModelLoadError, UnsupportedModelError, read_json
from .internvl_preprocess import InternVLImageSettings
from .qwen_preprocess import QwenImageSettings

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "internvl")
ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
               "gelu_pytorch_tanh": "gelu_tanh", "silu": "silu"}


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    family: str              # one of FAMILIES
    depth: int
    width: int               # the ViT's hidden size
    heads: int
    intermediate: int
    out_hidden: int          # the language model's hidden size (the merger's output)
    patch_size: int
    temporal_patch_size: int
    merge_size: int          # merge_size x merge_size patches become one token (InternVL: the pixel shuffle)
    in_channels: int
    activation: str          # "quick_gelu", "gelu", "gelu_tanh" (fc1/fc2 MLP) or "silu" (SwiGLU MLP)
    norm: str                # "layer_norm" or "rms_norm"
    norm_eps: float
    rope_theta: float
    window_size: int         # Qwen2.5-VL: window attention over window_size pixels (0: none)
    full_attention_blocks: tuple[int, ...]  # Qwen2.5-VL: the blocks that attend over the whole image
    image_token_id: int      # the token whose rows take the image's embeddings
    placeholder: tuple[int, ...]  # what a plain prompt gets per image before expansion
    image_prefix: tuple[int, ...]  # tokens the expansion puts around an image's tokens (InternVL: <img>, </img>)
    image_suffix: tuple[int, ...]
    preprocess: QwenImageSettings | InternVLImageSettings
    # InternVL only:
    image_size: int = 0      # the ViT's input tile (its absolute position table's size)
    qk_norm: bool = False
    final_norm: bool = False  # a LayerNorm after the last block (use_mean_pooling false)
    feature_layer: int = -1  # the hidden state the projector reads (-1: the last, after final_norm)
    projector_act: str = "gelu"

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def parameter_count(self) -> int:
        """Parameters of the encoder and merger (for the up-front memory check)."""
        w, i, o = self.width, self.intermediate, self.out_hidden
        mlp = (3 if self.activation == "silu" else 2) * w * i + 3 * i
        block = 4 * w * w + 4 * w + mlp + 4 * w + (2 * w if self.qk_norm else 0)
        merged = w * self.merge_size ** 2
        if self.family == "internvl":
            tokens = (self.image_size // self.patch_size) ** 2 + 1
            head = 2 * merged + merged * o + o + o * o + o
            return (self.patch_values + 1 + tokens) * w + self.depth * block + head
        return self.patch_values * w + self.depth * block + merged * merged + merged * o + 2 * merged

    def graph_bytes(self, patches: int, element: int) -> int:
        """About what one forward over `patches` patches allocates (a captured graph's pool): uint8,
        float64 and float32 pixels, the residual stream, norms, q/k/v, attention and MLP activations."""
        mlp = (3 if self.activation == "silu" else 2) * self.intermediate
        return patches * (element * (8 * self.width + mlp) + 16 * self.patch_values)

    @property
    def tile_tokens(self) -> int:
        """InternVL: the language-model tokens of one tile."""
        return (self.image_size // self.patch_size // self.merge_size) ** 2

    @property
    def patch_values(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2


def vision_config_of(model_dir: str | Path) -> VisionConfig | None:
    """The vision config of a VLM directory; None for a text-only model."""
    model_dir = Path(model_dir)
    hf = read_json(model_dir / "config.json", ModelLoadError)
    family = hf.get("model_type")
    if family not in FAMILIES:
        if "vision_config" in hf:
            raise UnsupportedModelError(f"vision-language model_type {family!r} is not supported; supported: "
                                        f"{', '.join(FAMILIES)}")
        return None
    pre_path = model_dir / "preprocessor_config.json"
    pre = read_json(pre_path, ModelLoadError) if pre_path.is_file() else {}
    try:
        return _internvl(hf, pre, model_dir) if family == "internvl" else _qwen(hf, family, pre)
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
    shape["activation"] = _activation(shape["activation"])
    image_token = int(text.get("image_token_id", 151655))
    start, end = text.get("vision_start_token_id"), text.get("vision_end_token_id")
    cfg = VisionConfig(
        family=family, depth=int(v["depth"]), heads=int(v["num_heads"]),
        patch_size=int(v.get("patch_size", 14)), temporal_patch_size=int(v.get("temporal_patch_size", 2)),
        merge_size=int(v.get("spatial_merge_size", 2)), in_channels=int(v.get("in_channels", v.get("in_chans", 3))),
        norm_eps=1e-6, rope_theta=float(rope.get("rope_theta", 10000.0)),
        image_token_id=image_token, placeholder=tuple(int(t) for t in (start, image_token, end) if t is not None),
        image_prefix=(), image_suffix=(), preprocess=QwenImageSettings.from_dict(pre, v), **shape)
    if cfg.width % cfg.heads or cfg.head_dim % 4:
        raise UnsupportedModelError(f"vision width {cfg.width} over {cfg.heads} heads: head_dim must be a multiple of 4")
    if cfg.preprocess.patch_size != cfg.patch_size or cfg.preprocess.merge_size != cfg.merge_size:
        raise ModelLoadError("preprocessor_config.json's patch / merge size disagrees with vision_config")
    return cfg


def _internvl(hf: dict, pre: dict, model_dir: Path) -> VisionConfig:
    v, text = hf["vision_config"], hf["text_config"]
    square = lambda value: int(value[0] if isinstance(value, (list, tuple)) else value)  # noqa: E731
    ratio = float(hf.get("downsample_ratio", 0.5))
    if round(1 / ratio) * ratio != 1:
        raise UnsupportedModelError(f"InternVL downsample_ratio {ratio}: only 1/n ratios are supported")
    layer = hf.get("vision_feature_layer", -1)
    if not isinstance(layer, int) or hf.get("vision_feature_select_strategy", "default") != "default":
        raise UnsupportedModelError("InternVL: only an integer vision_feature_layer with the 'default' "
                                    "(CLS token dropped) feature select strategy is supported")
    if v.get("use_mask_token") or not v.get("use_absolute_position_embeddings", True):
        raise UnsupportedModelError("InternVL vision towers without absolute position embeddings (or with a "
                                    "mask token) are not supported")
    image_token = int(hf.get("image_token_id", 151667))
    width = int(v.get("hidden_size", 1024))
    cfg = VisionConfig(
        family="internvl", depth=int(v.get("num_hidden_layers", 24)), width=width,
        heads=int(v.get("num_attention_heads", 16)), intermediate=int(v.get("intermediate_size", 4096)),
        out_hidden=int(text["hidden_size"]), patch_size=square(v.get("patch_size", 14)), temporal_patch_size=1,
        merge_size=round(1 / ratio), in_channels=int(v.get("num_channels", 3)),
        activation=_activation(v.get("hidden_act", "gelu")), norm=v.get("norm_type", "layer_norm"),
        norm_eps=float(v.get("layer_norm_eps", 1e-6)), rope_theta=0.0, window_size=0, full_attention_blocks=(),
        image_token_id=image_token, placeholder=(image_token,),
        image_prefix=(_added_token(model_dir, "<img>"),), image_suffix=(_added_token(model_dir, "</img>"),),
        preprocess=InternVLImageSettings.from_dict(pre), image_size=square(v.get("image_size", 448)),
        qk_norm=bool(v.get("use_qk_norm", False)), final_norm=not v.get("use_mean_pooling", True),
        feature_layer=int(layer), projector_act=_activation(hf.get("projector_hidden_act", "gelu")))
    if cfg.norm not in ("layer_norm", "rms_norm"):
        raise UnsupportedModelError(f"InternVL vision norm_type {cfg.norm!r} is not supported")
    if cfg.width % cfg.heads:
        raise UnsupportedModelError(f"vision width {cfg.width} is not a multiple of its {cfg.heads} heads")
    if cfg.preprocess.tile_size != cfg.image_size:
        raise ModelLoadError(f"preprocessor_config.json's tile size {cfg.preprocess.tile_size} differs from the "
                             f"vision tower's image_size {cfg.image_size} (position tables are not interpolated)")
    if (cfg.image_size // cfg.patch_size) % cfg.merge_size or cfg.activation == "silu":
        raise UnsupportedModelError("InternVL: the patch grid must divide by the pixel shuffle, and the MLP "
                                    "activation be a GELU")
    return cfg


def _activation(name: str) -> str:
    if name not in ACTIVATIONS:
        raise UnsupportedModelError(f"vision activation {name!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def _added_token(model_dir: Path, content: str) -> int:
    """The id of one of the tokenizer's added tokens (InternVL's <img> / </img>)."""
    path = model_dir / "tokenizer.json"
    added = read_json(path, ModelLoadError, f" (an InternVL model needs its {content} token)").get("added_tokens", [])
    for token in added:
        if token.get("content") == content:
            return int(token["id"])
    raise ModelLoadError(f"{path} has no {content} token, which InternVL prompts need around each image")
