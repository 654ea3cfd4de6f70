"""Image loading and preprocessing against transformers' PIL image processors: the same pixel_values
and grids (atol 1e-6, float32) for odd sizes, grey, palette and RGBA images."""

import io

import numpy as np
import pytest
from PIL import Image

from edgellm.errors import ImageError
from edgellm.vision.images import image_digest, load_image
from edgellm.vision.qwen_preprocess import QwenImageSettings, preprocess_qwen


def make_image(width, height, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    if mode == "L":
        return Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8), "L")
    if mode == "RGBA":
        return Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA")
    if mode == "P":
        return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB").convert("P")
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


CASES = [(57, 333, "RGB"), (640, 480, "RGB"), (1000, 200, "RGB"), (97, 61, "L"), (130, 90, "RGBA"), (64, 100, "P")]


@pytest.mark.parametrize("width,height,mode", CASES)
@pytest.mark.parametrize("limits", [{}, {"min_pixels": 100 * 28 * 28, "max_pixels": 200 * 28 * 28}])
def test_qwen_preprocessing_matches_transformers(width, height, mode, limits):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    image = make_image(width, height, mode)
    hf = Qwen2VLImageProcessorPil(**limits)(images=[image], return_tensors="np")
    settings = QwenImageSettings(**limits) if limits else QwenImageSettings()
    pixels, grid = preprocess_qwen(load_image(image), settings)
    assert list(hf["image_grid_thw"][0]) == list(grid)
    assert pixels.dtype == np.float32 and pixels.shape == hf["pixel_values"].shape
    np.testing.assert_allclose(pixels, hf["pixel_values"], atol=1e-6, rtol=0)


def test_settings_from_saved_preprocessor_config(tmp_path):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=50000).save_pretrained(tmp_path)
    import json
    settings = QwenImageSettings.from_dict(json.loads((tmp_path / "preprocessor_config.json").read_text()))
    assert (settings.min_pixels, settings.max_pixels, settings.merge_size) == (3136, 50000, 2)


def test_load_image_sources_and_exif(tmp_path):
    image = make_image(40, 30)
    path = tmp_path / "a.png"
    image.save(path)
    encoded = io.BytesIO()
    image.save(encoded, format="PNG")
    for source in (path, str(path), encoded.getvalue(), image):
        loaded = load_image(source)
        assert loaded.mode == "RGB" and loaded.size == (40, 30)
        assert image_digest(loaded) == image_digest(image)
    # EXIF orientation 6 (rotate 90 clockwise to view): a 40x30 file is seen as 30x40.
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = tmp_path / "r.jpg"
    image.save(rotated, exif=exif)
    assert load_image(rotated).size == (30, 40)
    assert image_digest(load_image(make_image(40, 30, seed=1))) != image_digest(image)


def test_bad_image_sources(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    with pytest.raises(ImageError, match="cannot read"):
        load_image(tmp_path / "junk.png")
    with pytest.raises(ImageError, match="not an image"):
        load_image(b"\x00\x01\x02")
    with pytest.raises(ImageError, match="file path, encoded image bytes or a PIL image"):
        load_image(12)
    with pytest.raises(ImageError, match="aspect ratio"):
        preprocess_qwen(make_image(1000, 4), QwenImageSettings())


@pytest.mark.parametrize("width,height,mode", CASES + [(2000, 300, "RGB"), (448, 448, "RGB")])
@pytest.mark.parametrize("tiles", [(1, 12), (1, 4), (2, 6)])
def test_internvl_tiling_matches_transformers(width, height, mode, tiles):
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    from edgellm.vision.internvl_preprocess import (IMAGENET_MEAN, IMAGENET_STD, InternVLImageSettings,
                                                   internvl_tiles, preprocess_internvl)

    image = make_image(width, height, mode)
    hf = GotOcr2ImageProcessorPil(size={"height": 448, "width": 448}, crop_to_patches=True, min_patches=tiles[0],
                                  max_patches=tiles[1], image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
    expected = hf(images=[image], return_tensors="np")
    settings = InternVLImageSettings(min_tiles=tiles[0], max_tiles=tiles[1])
    pixels = preprocess_internvl(load_image(image), settings)
    assert pixels.shape == expected["pixel_values"].shape
    assert internvl_tiles(load_image(image), settings) == pixels.shape[0] == expected["num_patches"][0]
    np.testing.assert_allclose(pixels, expected["pixel_values"], atol=1e-6, rtol=0)


def test_internvl_settings_tile_as_the_transformers_processor_does():
    """InternVLProcessor passes crop_to_patches=True to its image processor unless told otherwise, so a
    preprocessor_config.json that says false still tiles in transformers, and here."""
    from edgellm.vision.internvl_preprocess import InternVLImageSettings

    settings = InternVLImageSettings.from_dict({"size": {"height": 448, "width": 448}, "crop_to_patches": False,
                                                "min_patches": 1, "max_patches": 6})
    assert settings.tiling and (settings.tile_size, settings.min_tiles, settings.max_tiles) == (448, 1, 6)
