"""Image sources (a path, encoded bytes, or a PIL image) -> an RGB PIL image, and its digest.

EXIF orientation is applied (a phone photo stored sideways is seen upright). Transparency is
composited onto white and grey / palette / CMYK images are converted to RGB, as transformers' image
processors do, so pixels match theirs.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

from ..errors import ImageError

try:
    from PIL import Image, ImageOps, UnidentifiedImageError
except ImportError:  # pragma: no cover - pillow is a dependency; this keeps text-only imports working
    Image = ImageOps = UnidentifiedImageError = None


def _require_pillow() -> None:
    if Image is None:
        raise ImageError("images need pillow: pip install pillow")


def _open(source, where: str):
    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        if not path.is_file():
            raise ImageError(f"{where}: image file not found: {path}")
        try:
            return Image.open(path)
        except (UnidentifiedImageError, OSError) as exc:
            raise ImageError(f"{where}: cannot read {path} as an image: {exc}") from exc
    if isinstance(source, (bytes, bytearray, memoryview)):
        try:
            return Image.open(io.BytesIO(bytes(source)))
        except (UnidentifiedImageError, OSError) as exc:
            raise ImageError(f"{where}: the {len(source)} bytes given are not an image pillow can read") from exc
    if isinstance(source, Image.Image):
        return source
    raise ImageError(f"{where}: an image must be a file path, encoded image bytes or a PIL image, "
                     f"got {type(source).__name__}")


def load_image(source, where: str = "image"):
    """An RGB PIL image, fully decoded (a truncated file fails here, before any model work)."""
    _require_pillow()
    image = _open(source, where)
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, rgba).convert("RGB")
        elif image.mode != "RGB":
            image = image.convert("RGB")
    except (OSError, ValueError) as exc:
        raise ImageError(f"{where}: cannot decode the image: {exc}") from exc
    if image.width < 1 or image.height < 1:
        raise ImageError(f"{where}: the image is empty ({image.width}x{image.height})")
    return image


def image_digest(image) -> str:
    """A digest of an RGB image's pixels (and size): what the encoder cache and the KV-reuse keys
    know an image by, so equal pixels from different files share, and different pixels never do."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()
