"""Images in requests: the runtime's side of vision-language models.

For each item: its images (message content parts `{"type": "image", "image": ...}` or a prompt
item's `images=[...]`) are loaded and preprocessed by the model's VisionEncoder; the prompt gets one
image placeholder token per image (the chat template writes it; a plain prompt gets the family's
placeholder in front unless it already holds one per image: Qwen's
`<|vision_start|><|image_pad|><|vision_end|>`, InternVL's `<IMG_CONTEXT>`), then each placeholder is
expanded to the image's token count (InternVL: wrapped in `<img>` ... `</img>`). After the prompt's token embeddings are
looked up, the encoder's outputs are written over the placeholder rows. Qwen models also get their
(t, h, w) RoPE positions and the decode offset (vision/mrope.py).

KV reuse keys name image tokens by the image's pixel digest, so two prompts with different images
behind the same placeholder ids never share a saved block.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from .errors import InvalidRequestError
from .vision.encoder import PreparedImage, VisionEncoder
from .vision.mrope import mrope_positions


@dataclasses.dataclass
class ImagePrompt:
    """One item's prompt after its images were placed."""
    ids: list[int]                   # the expanded prompt
    images: list[PreparedImage]
    starts: list[int]                # the first token of each image in `ids`
    positions: torch.Tensor | None   # [len(ids), 3] multimodal RoPE positions (Qwen), else None
    delta: int                       # decode positions = cache positions + delta
    key_ids: list[int]               # `ids` with image tokens named by their image's digest (KV reuse)


def image_sources(item) -> list:
    """The images of a request item, in prompt order (validated in requests.py)."""
    if item.images is not None:
        return list(item.images)
    sources = []
    for message in item.messages or []:
        if isinstance(message["content"], list):
            sources += [part["image"] for part in message["content"] if part.get("type") == "image"]
    return sources


def template_messages(messages: list[dict], text_only: bool = False) -> list[dict]:
    """Messages as the chat template sees them: image parts reduced to {"type": "image"} (the
    template writes a placeholder; the pixels are not its business). text_only (a text model, whose
    template expects string contents): a list of text parts becomes their texts joined by newlines."""
    out = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list) and text_only:
            content = "\n".join(part["text"] for part in content)
        elif isinstance(content, list):
            content = [{"type": "image"} if part.get("type") == "image" else part for part in content]
        out.append({**message, "content": content})
    return out


class ImagePrompts:
    def __init__(self, encoder: VisionEncoder, max_input_length: int):
        self.encoder = encoder
        self.config = encoder.config
        self.max_input_length = max_input_length

    def prepare(self, sources: list, index: int) -> list[PreparedImage]:
        return [self.encoder.prepare(s, f"request item {index} image {j}") for j, s in enumerate(sources)]

    def place_item(self, item, ids: list[int], index: int, mrope: bool) -> ImagePrompt | None:
        """A request item's images loaded, preprocessed and placed in its prompt ids (None: no images)."""
        sources = image_sources(item)
        if not sources:
            if self.config.image_token_id in ids:
                raise InvalidRequestError(f"request item {index}: the prompt holds image placeholder tokens "
                                          f"({self.config.image_token_id}) but the item has no images")
            return None
        prepared = self.prepare(sources, index)
        if item.prompt is not None:
            ids = self.placeholders(ids, len(prepared))
        return self.place(ids, prepared, index, mrope)

    def placeholders(self, ids: list[int], count: int) -> list[int]:
        """A plain prompt's ids with one placeholder per image in front, unless it has them already."""
        cfg = self.config
        if ids.count(cfg.image_token_id) == count:
            return ids
        return list(cfg.placeholder) * count + ids

    def place(self, ids: list[int], images: list[PreparedImage], index: int, mrope: bool) -> ImagePrompt:
        image_token = self.config.image_token_id
        found = [i for i, t in enumerate(ids) if t == image_token]
        if len(found) != len(images):
            raise InvalidRequestError(
                f"request item {index}: {len(images)} images but the prompt has {len(found)} image placeholders "
                f"(token {image_token}); give one image per placeholder")
        prefix, suffix = list(self.config.image_prefix), list(self.config.image_suffix)
        expanded, key_ids, starts = [], [], []
        cursor = 0
        for at, image in zip(found, images):
            expanded += ids[cursor:at] + prefix
            key_ids += ids[cursor:at] + prefix
            starts.append(len(expanded))
            expanded += [image_token] * image.tokens + suffix
            key_ids += _image_key(image.digest, image.tokens) + suffix
            cursor = at + 1
        expanded += ids[cursor:]
        key_ids += ids[cursor:]
        if len(expanded) > self.max_input_length:
            raise InvalidRequestError(
                f"request item {index}: the prompt is {len(expanded)} tokens with its images "
                f"({sum(im.tokens for im in images)} image tokens), more than the engine's max_input_length "
                f"{self.max_input_length}; use smaller images (preprocessor max_pixels) or a larger max_input_length")
        positions, delta = None, 0
        if mrope:
            positions, delta = mrope_positions(len(expanded), [(s, im.grid) for s, im in zip(starts, images)],
                                               self.config.merge_size)
        return ImagePrompt(expanded, images, starts, positions, delta, key_ids)

    def write_embeddings(self, embeds: torch.Tensor, prompts: list[ImagePrompt | None], cached: list[int]) -> float:
        """Write the images' embeddings over their placeholder rows of `embeds` [B, S, H] (row b holds
        prompt b from token cached[b] on); images wholly inside a reused prefix are not encoded.
        Returns the encoder's milliseconds."""
        wanted = []
        for row, (prompt, skip) in enumerate(zip(prompts, cached)):
            for start, image in zip(prompt.starts if prompt else [], prompt.images if prompt else []):
                if start + image.tokens > skip:
                    wanted.append((row, start - skip, image))
        if not wanted:
            return 0.0
        began = time.perf_counter()
        outputs = self.encoder.encode([image for _, _, image in wanted])
        for (row, at, _), emb in zip(wanted, outputs):
            lo = max(0, -at)  # tokens of the image inside the reused prefix
            embeds[row, at + lo:at + emb.shape[0]] = emb[lo:].to(embeds.dtype)
        if embeds.is_cuda:
            torch.cuda.synchronize(embeds.device)
        return (time.perf_counter() - began) * 1e3


def prefill_positions(prompts: list[list[int]], images: list[ImagePrompt | None], cached: list[int], width: int):
    """Multimodal RoPE: the (t, h, w) positions of each row's prefilled tokens (from cached[b] on),
    [B, width, 3] int32, and each row's decode offset. Text-only rows count up plainly."""
    positions = torch.zeros(len(prompts), width, 3, dtype=torch.int32)
    for row, (p, im, c) in enumerate(zip(prompts, images, cached)):
        if im is not None:
            positions[row, :len(p) - c] = im.positions[c:]
        else:
            positions[row, :len(p) - c] = torch.arange(c, len(p), dtype=torch.int32)[:, None]
    return positions, [im.delta if im is not None else 0 for im in images]


def _image_key(digest: str, count: int) -> list[int]:
    """Stand-ins for an image's tokens in KV-reuse keys: negative (no real token id is), from the
    pixel digest, one per token position."""
    base = int(digest.split(":")[0][:15], 16)
    return [-(1 + ((base + i) & ((1 << 62) - 1))) for i in range(count)]
