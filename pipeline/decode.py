"""Turning untrusted image bytes into an upright, fully loaded RGB image.

The rules, in the order they are applied:

* 0 bytes -> `image.empty`.
* Only the formats in `ImageSettings.allowed_formats` are parsed at all
  (`Image.open(..., formats=...)`). When none of them opens the bytes, the
  plugins' cheap magic-byte tests (never their parsers) say why: an allowed
  format's magic with an unparsable header -> `image.corrupt`; a disallowed
  format's magic -> `image.format_not_allowed`; nothing -> `image.unsupported_format`.
* Size limit, checked on the header's declared size BEFORE any pixel is
  decoded, mirroring Pillow's own two-step rule: more than
  `2 * max_pixels` pixels -> `image.decompression_bomb`; more than `max_pixels`
  -> `image.too_large`. Pillow's global guard (`Image.MAX_IMAGE_PIXELS`, left
  untouched) also runs inside `Image.open`; its DecompressionBombError (and its
  warning, where warnings are configured as errors) map to
  `image.decompression_bomb` too. A side shorter than `min_side` -> `image.too_small`.
  A long side over `MAX_ASPECT_RATIO` times the short side ->
  `image.extreme_aspect_ratio`: the model's resize scales the SHORT side up to
  its input size, so a tiny 1x100000 strip would become a multi-GB image there.
* Decoding errors: data that runs out ("image file is truncated") ->
  `image.truncated`; anything else Pillow raises on malformed data, including
  "broken data stream" (the decoder rejected bytes that were there) and
  truncated WebP (libwebp refuses it at open) -> `image.corrupt`.

Only the first frame of an animation is used. EXIF orientation is applied (a
malformed EXIF block is ignored, not fatal), and every mode is brought to 8-bit
RGB: 16/32-bit greyscale is rescaled instead of clipped, anything with
transparency is composited onto white, and a mode Pillow cannot convert to RGB
-> `image.unsupported_format`. An unknown name in `allowed_formats` is a
ConfigError, not an ImageError.

Nothing here mutates Pillow's global state per call, so it is thread-safe.
`ImageFile.LOAD_TRUNCATED_IMAGES` is never set.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from io import BytesIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.config import ImageSettings
from pipeline.errors import ConfigError, ImageError

# Register every plugin once, up front, so no request races the lazy import.
Image.init()

_WHITE = (255, 255, 255)
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_HIGH_DEPTH_GREY_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
# What Pillow raises for malformed data; it has no one exception type for it.
_CORRUPT_ERRORS = (ValueError, struct.error, IndexError, SyntaxError, OSError, zlib.error, EOFError)
# Pillow says "image file is truncated" when the data runs out. Its "broken data
# stream" means the decoder rejected bytes that were there: corrupt, not short.
_TRUNCATION_HINTS = ("truncated",)
# Far beyond panoramas (~12:1) and full-page screenshots (~25:1). Preprocessing
# to a 320 px input costs about 320 * 320 * ratio * 3 bytes, here 31 MB at most.
MAX_ASPECT_RATIO = 100


def decode_image(data: bytes, settings: ImageSettings, *, draft_size: int | None = None) -> Image.Image:
    """Decode `data` to an upright RGB image with every pixel loaded.

    `draft_size` (fast preprocessing only) lets a JPEG decode at 1/2, 1/4 or
    1/8 scale in the DCT domain, never below `draft_size` on either side; None
    decodes at full size. The size limits always apply to the declared size.

    Raises ImageError (stage "decode") with the codes listed in the module
    docstring. Never returns an image still backed by the input buffer.
    """
    if not data:
        raise ImageError("image is 0 bytes", code="image.empty")
    with _open_image(data, settings) as im:
        _check_declared_size(im.size, settings)
        if draft_size is not None:
            _request_draft(im, draft_size)
        _load_pixels(im)
        _apply_exif_orientation(im)
        # Every branch of _to_rgb builds a new image, detached from the file.
        return _to_rgb(im)


def allowed_pillow_formats(formats: tuple[str, ...]) -> tuple[str, ...]:
    """Upper-case `formats`, raising ConfigError for names Pillow doesn't know.

    Pillow raises a bare KeyError for an unknown name in `formats=`, which
    would otherwise surface as a confusing per-image failure.
    """
    return _validated_formats(tuple(formats))


@lru_cache(maxsize=16)
def _validated_formats(formats: tuple[str, ...]) -> tuple[str, ...]:
    upper = tuple(name.upper() for name in formats)
    unknown = [name for name in upper if name not in Image.OPEN]
    if unknown:
        raise ConfigError(f"image.allowed_formats: Pillow cannot open {unknown}; known: {sorted(Image.OPEN)}")
    return upper


@contextmanager
def _open_image(data: bytes, settings: ImageSettings) -> Iterator[Image.Image]:
    formats = allowed_pillow_formats(settings.allowed_formats)
    try:
        im = Image.open(BytesIO(data), formats=formats)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"declared size is a decompression bomb: {exc}", code="image.decompression_bomb") from None
    except UnidentifiedImageError:
        raise _unrecognised(data, formats) from None
    except _CORRUPT_ERRORS as exc:
        raise ImageError(f"image header is corrupt: {exc!r}", code="image.corrupt") from None
    with im:
        yield im


def _unrecognised(data: bytes, allowed: tuple[str, ...]) -> ImageError:
    prefix = data[:16]
    looks_allowed = _formats_claiming(prefix, among=allowed)
    if looks_allowed:
        return ImageError(f"looks like {looks_allowed[0]} but its header is unreadable", code="image.corrupt")
    claimed = _formats_claiming(prefix, among=tuple(name for name in Image.OPEN if name not in allowed))
    if claimed:
        return ImageError(
            f"image looks like {claimed[0]}, which is not in the allowed formats {list(allowed)}",
            code="image.format_not_allowed",
        )
    return ImageError(f"not an image in any allowed format {list(allowed)}", code="image.unsupported_format")


def _formats_claiming(prefix: bytes, among: tuple[str, ...]) -> list[str]:
    # Only the plugins' magic-byte tests run here, never a parser: the point of
    # the allowlist is that disallowed parsers don't see hostile bytes.
    claimed = []
    for name in among:
        accept = Image.OPEN[name][1]
        if accept is None:
            continue
        try:
            verdict = accept(prefix)
        except Exception:  # a sniffing failure just means "not this format"
            continue
        # A str verdict is Pillow's "recognised, but this build can't read it".
        if verdict and not isinstance(verdict, str):
            claimed.append(name)
    return claimed


def _check_declared_size(size: tuple[int, int], settings: ImageSettings) -> None:
    width, height = size
    pixels = width * height
    if pixels > 2 * settings.max_pixels:
        raise ImageError(
            f"declared size {width}x{height} is over twice the {settings.max_pixels}-pixel limit",
            code="image.decompression_bomb",
        )
    if pixels > settings.max_pixels:
        raise ImageError(
            f"declared size {width}x{height} is over the {settings.max_pixels}-pixel limit", code="image.too_large"
        )
    if min(width, height) < settings.min_side:
        raise ImageError(f"image is {width}x{height}, a side is under {settings.min_side}px", code="image.too_small")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ImageError(
            f"image is {width}x{height}, a side is over {MAX_ASPECT_RATIO} times the other",
            code="image.extreme_aspect_ratio",
        )


def _request_draft(im: Image.Image, size: int) -> None:
    # Only JPEG implements draft; other formats return None and decode at full size.
    if im.format != "JPEG":
        return
    try:
        im.draft("RGB", (size, size))
    except _CORRUPT_ERRORS as exc:
        raise ImageError(f"image header is corrupt: {exc!r}", code="image.corrupt") from None


def _load_pixels(im: Image.Image) -> None:
    try:
        im.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"decompression bomb while loading: {exc}", code="image.decompression_bomb") from None
    except _CORRUPT_ERRORS as exc:
        raise ImageError(f"image data is unreadable: {exc!r}", code=_load_error_code(exc)) from None


def _load_error_code(exc: BaseException) -> str:
    if isinstance(exc, EOFError):
        return "image.truncated"
    text = str(exc).lower()
    if isinstance(exc, OSError) and any(hint in text for hint in _TRUNCATION_HINTS):
        return "image.truncated"
    return "image.corrupt"


def _apply_exif_orientation(im: Image.Image) -> None:
    # In place: the opened image is ours alone, and a copy of a 12 MP photo
    # is 36 MB. A malformed EXIF block is common in real uploads and says
    # nothing about the pixels, so it costs the orientation, not the image.
    try:
        ImageOps.exif_transpose(im, in_place=True)
    except _CORRUPT_ERRORS + (KeyError,):
        return


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in _HIGH_DEPTH_GREY_MODES:
        return _high_depth_grey_to_rgb(im)
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        return _composite_on_white(im)
    try:
        return im.convert("RGB")
    except ValueError as exc:
        raise ImageError(f"cannot convert mode {im.mode} to RGB: {exc}", code="image.unsupported_format") from None


def _high_depth_grey_to_rgb(im: Image.Image) -> Image.Image:
    """Rescale 16-bit (and 32-bit int/float) greyscale to 8 bits.

    `convert("RGB")` clips these to 255, turning most 16-bit images white.
    Integer modes are taken as 16-bit samples (what PNG and TIFF store);
    float images are taken as 0..1 when they fit, else as 0..255.
    """
    samples = np.asarray(im, dtype=np.float64)
    if im.mode == "F":
        samples = np.nan_to_num(samples, nan=0.0, posinf=255.0, neginf=0.0)
        scale = 255.0 if samples.size and samples.max() <= 1.0 else 1.0
    else:
        scale = 255.0 / 65535.0
    grey = np.clip(np.rint(samples * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def _composite_on_white(im: Image.Image) -> Image.Image:
    rgba = im.convert("RGBA")
    background = Image.new("RGB", rgba.size, _WHITE)
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background
