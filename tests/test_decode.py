"""decode_image against hostile and odd inputs, all generated here."""

from __future__ import annotations

import io
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image, ImageFile

from pipeline.config import ImageSettings
from pipeline.decode import decode_image
from pipeline.errors import ConfigError, ImageError

RED = (255, 0, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)
DEFAULTS = ImageSettings()


def encode(im: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    im.save(buffer, fmt, **params)
    return buffer.getvalue()


def noise_image(width: int = 300, height: int = 200) -> Image.Image:
    # Noise doesn't compress, so a cut anywhere lands inside pixel data.
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_declaring(width: int, height: int) -> bytes:
    """A valid-looking 1-bit PNG header declaring any size, with almost no pixel data."""
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + png_chunk(b"IEND", b"")
    )


def two_tone(width: int, height: int, top: tuple[int, int, int], bottom: tuple[int, int, int]) -> Image.Image:
    im = Image.new("RGB", (width, height), top)
    im.paste(bottom, (0, height // 2, width, height))
    return im


def decode_error(data: bytes, settings: ImageSettings = DEFAULTS) -> ImageError:
    with pytest.raises(ImageError) as caught:
        decode_image(data, settings)
    assert caught.value.stage == "decode"
    assert caught.value.retryable is False
    return caught.value


def assert_close(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 12) -> None:
    assert all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True)), (actual, expected)


# --- refusals ----------------------------------------------------------------


def test_zero_bytes_is_empty() -> None:
    assert decode_error(b"").code == "image.empty"


def test_text_is_unsupported_format() -> None:
    assert decode_error(b"hello, I am definitely not an image\n" * 10).code == "image.unsupported_format"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "BMP", "TIFF"])
def test_truncated_image(fmt: str) -> None:
    data = encode(noise_image(), fmt)
    assert decode_error(data[: len(data) // 2]).code == "image.truncated"


def test_truncated_image_leaves_pillow_global_alone() -> None:
    data = encode(noise_image(), "JPEG")
    decode_error(data[: len(data) // 2])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_truncated_webp_is_corrupt() -> None:
    # libwebp refuses a short file at open, without saying it is short.
    data = encode(noise_image(), "WEBP")
    assert decode_error(data[: len(data) // 2]).code == "image.corrupt"


def test_garbled_png_pixel_data_is_corrupt() -> None:
    data = bytearray(encode(noise_image(), "PNG"))
    start = data.find(b"IDAT") + 10
    data[start : start + 200] = bytes(200)
    assert decode_error(bytes(data)).code == "image.corrupt"


def test_png_with_bad_header_checksum_is_corrupt() -> None:
    data = bytearray(encode(noise_image(8, 8), "PNG"))
    data[29] ^= 0xFF  # inside the IHDR CRC
    assert decode_error(bytes(data)).code == "image.corrupt"


def test_huge_declared_png_is_bomb_without_being_decoded() -> None:
    data = png_declaring(30_000, 30_000)
    assert len(data) < 200
    assert decode_error(data).code == "image.decompression_bomb"


def test_over_twice_max_pixels_is_bomb() -> None:
    settings = ImageSettings(max_pixels=1_000_000)
    assert decode_error(png_declaring(2_001, 1_000), settings).code == "image.decompression_bomb"


def test_over_max_pixels_is_too_large_before_loading() -> None:
    # The pixel data is a stub: reaching load() would say "truncated" instead.
    settings = ImageSettings(max_pixels=1_000_000)
    assert decode_error(png_declaring(1_001, 1_000), settings).code == "image.too_large"


def test_exactly_max_pixels_is_allowed_through_to_decoding() -> None:
    settings = ImageSettings(max_pixels=1_000_000)
    assert decode_error(png_declaring(1_000, 1_000), settings).code == "image.truncated"


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "WEBP"])
def test_format_outside_allowlist(fmt: str) -> None:
    settings = ImageSettings(allowed_formats=("JPEG", "PNG"))
    data = encode(Image.new("RGB", (16, 16), RED), fmt)
    assert decode_error(data, settings).code == "image.format_not_allowed"
    assert_close(decode_image(data, DEFAULTS).getpixel((8, 8)), RED)


def test_unknown_format_name_in_settings_is_config_error() -> None:
    with pytest.raises(ConfigError):
        decode_image(encode(Image.new("RGB", (4, 4)), "PNG"), ImageSettings(allowed_formats=("PNG", "HEIC2")))


def test_side_under_min_side_is_too_small() -> None:
    data = encode(Image.new("RGB", (16, 40), RED), "PNG")
    assert decode_error(data, ImageSettings(min_side=32)).code == "image.too_small"
    assert decode_image(data, ImageSettings(min_side=16)).size == (16, 40)


# --- modes -------------------------------------------------------------------


def test_result_is_detached_rgb() -> None:
    decoded = decode_image(encode(Image.new("RGB", (8, 8), RED), "PNG"), DEFAULTS)
    assert decoded.mode == "RGB"
    assert not isinstance(decoded, ImageFile.ImageFile)
    assert decoded.getpixel((7, 7)) == RED


def test_one_pixel_image() -> None:
    decoded = decode_image(encode(Image.new("RGB", (1, 1), BLUE), "PNG"), DEFAULTS)
    assert decoded.size == (1, 1)
    assert decoded.getpixel((0, 0)) == BLUE


def test_cmyk_jpeg_becomes_rgb() -> None:
    data = encode(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    decoded = decode_image(data, DEFAULTS)
    assert decoded.mode == "RGB"
    assert_close(decoded.getpixel((16, 16)), RED)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_grey_is_scaled_not_clipped(fmt: str) -> None:
    samples = np.array([[0, 32_768, 65_535, 4_096]] * 4, dtype=np.uint16)
    data = encode(Image.fromarray(samples), fmt)
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    decoded = decode_image(data, DEFAULTS)
    assert [decoded.getpixel((x, 0)) for x in range(4)] == [(0, 0, 0), (128, 128, 128), WHITE, (16, 16, 16)]


def test_palette_with_transparency_composites_on_white() -> None:
    im = Image.new("P", (4, 2), 0)
    im.putpalette([*RED, *BLUE] + [0] * 762)
    im.paste(1, (2, 0, 4, 2))
    data = encode(im, "PNG", transparency=0)
    decoded = decode_image(data, DEFAULTS)
    assert decoded.getpixel((0, 0)) == WHITE
    assert decoded.getpixel((3, 1)) == BLUE


def test_half_transparent_rgba_blends_with_white() -> None:
    decoded = decode_image(encode(Image.new("RGBA", (4, 4), (0, 0, 0, 128)), "PNG"), DEFAULTS)
    assert_close(decoded.getpixel((1, 1)), (127, 127, 127), tolerance=1)


def test_transparent_grey_alpha_becomes_white() -> None:
    decoded = decode_image(encode(Image.new("LA", (4, 4), (0, 0)), "PNG"), DEFAULTS)
    assert decoded.getpixel((2, 2)) == WHITE


def test_grayscale_becomes_equal_rgb_channels() -> None:
    decoded = decode_image(encode(Image.new("L", (4, 4), 100), "PNG"), DEFAULTS)
    assert decoded.mode == "RGB"
    assert decoded.getpixel((0, 0)) == (100, 100, 100)


def test_animated_gif_uses_first_frame() -> None:
    first, second = Image.new("RGB", (20, 10), RED), Image.new("RGB", (20, 10), BLUE)
    data = encode(first, "GIF", save_all=True, append_images=[second], duration=100, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    decoded = decode_image(data, DEFAULTS)
    assert decoded.size == (20, 10)
    assert decoded.getpixel((10, 5)) == RED


@pytest.mark.parametrize(
    ("orientation", "left", "right"),
    [
        (6, BLUE, RED),  # stored image must turn 90 degrees clockwise: its top goes right
        (8, RED, BLUE),  # ... 90 degrees anticlockwise: its top goes left
    ],
)
def test_exif_orientation_is_applied(
    orientation: int, left: tuple[int, int, int], right: tuple[int, int, int]
) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(two_tone(60, 40, top=RED, bottom=BLUE), "JPEG", exif=exif, quality=95)
    decoded = decode_image(data, DEFAULTS)
    assert decoded.size == (40, 60)
    assert_close(decoded.getpixel((5, 30)), left)
    assert_close(decoded.getpixel((34, 30)), right)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_malformed_exif_costs_only_the_orientation() -> None:
    broken_exif = b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x05\x01\x12\x00\x03"
    decoded = decode_image(encode(Image.new("RGB", (30, 20), RED), "JPEG", exif=broken_exif), DEFAULTS)
    assert decoded.size == (30, 20)
    assert_close(decoded.getpixel((15, 10)), RED)


@pytest.mark.parametrize(
    ("fmt", "params"), [("JPEG", {"quality": 90}), ("PNG", {"compress_level": 1}), ("WEBP", {"method": 0})]
)
def test_large_photo_sized_images_decode(fmt: str, params: dict[str, object]) -> None:
    ys, xs = np.mgrid[0:3000, 0:4000]
    pixels = np.stack([xs % 256, ys % 256, np.full_like(xs, 128)], axis=-1).astype(np.uint8)
    decoded = decode_image(encode(Image.fromarray(pixels), fmt, **params), DEFAULTS)
    assert decoded.size == (4000, 3000)
    assert_close(decoded.getpixel((2100, 1550)), (2100 % 256, 1550 % 256, 128), tolerance=16)


def test_concurrent_decodes_with_different_settings() -> None:
    small_only = ImageSettings(max_pixels=1_000)
    jpeg_only = ImageSettings(allowed_formats=("JPEG",))
    cases = [
        (encode(Image.new("RGB", (40, 40), RED), "PNG"), small_only, "image.too_large"),
        (encode(Image.new("RGB", (20, 20), RED), "PNG"), jpeg_only, "image.format_not_allowed"),
        (encode(Image.new("RGB", (20, 20), RED), "PNG"), DEFAULTS, None),
    ] * 30

    def outcome(case: tuple[bytes, ImageSettings, str | None]) -> str | None:
        try:
            decode_image(case[0], case[1])
        except ImageError as exc:
            return exc.code
        return None

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(outcome, cases)) == [expected for _, _, expected in cases]
