"""Vision-language models: images in, embeddings out (DESIGN.md: vision sits beside the engine).

images.py loads and normalises image sources; qwen_preprocess.py / internvl_preprocess.py turn an
image into the pixel tensors of a family; config.py reads a VLM directory's vision settings;
qwen_vit.py / intern_vit.py are the encoders; encoder.py picks one and caches its outputs; mrope.py
lays out Qwen's (t, h, w) positions. The runtime (multimodal.py) expands image placeholders and
writes the embeddings into the prompt.
"""

from .config import VisionConfig, vision_config_of
from .encoder import VisionEncoder
from .images import load_image

__all__ = ["VisionConfig", "VisionEncoder", "load_image", "vision_config_of"]
