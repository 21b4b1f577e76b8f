"""Stored image bytes → one 8-bit RGB PIL image: the one decoder every stage uses.

:func:`decode_image` is what the eval-set loader, the CLIP encoder and the detector call on the
bytes they hold, so an image is either read the same way everywhere or refused everywhere with
the same reason. What it does, in order:

1. **Refuses an oversized image before decoding a pixel.** PIL reads only the header to learn the
   size; more than ``max_pixels`` pixels raises :class:`ImageTooLarge`, whose message is
   ``"too large (W×H = N pixels > limit M)"``. :data:`DEFAULT_MAX_PIXELS` is PIL's own default
   ``Image.MAX_IMAGE_PIXELS`` (89,478,485 pixels, about 9459², i.e. 1024·1024·1024/4/3) — but
   where PIL only *warns* above it (and refuses above twice it), this module refuses. PIL's
   guard (the global ``Image.MAX_IMAGE_PIXELS``) stays in force beneath ours: an image it refuses
   is reported as :class:`ImageTooLarge` too, with PIL's limit.
2. **Decodes at reduced scale on request.** With ``draft_size=(w, h)``, a JPEG is decoded by
   libjpeg's DCT scaling (``Image.draft``) at the smallest of 1/1, 1/2, 1/4, 1/8 scale that still
   covers ``(w, h)``, so a huge photo never materialises at full size (the detector, whose input
   is small, asks for this). Other formats ignore it. The size the image has at full scale
   (after orientation) is kept in ``image.info[FULL_SIZE_KEY]`` so coordinates measured on the
   reduced image can be mapped back.
3. **Takes the first frame** of an animated or multi-page image (GIF, APNG, multi-page TIFF,
   WebP): captioning describes one picture, and frame 0 is what viewers show as the still.
4. **Brings every mode to 8-bit RGB**:

   - ``I;16``, ``I;16B``, ``I;16L``, ``I;16N`` (16-bit grey, e.g. a 16-bit PNG): ``round(v / 257)``,
     so 0..65535 maps onto 0..255. (16-bit *colour* PNGs are delivered by PIL already reduced to
     8 bits, by taking the high byte: within 1 of ``round(v / 257)``.)
   - ``I`` (32-bit signed integer) and ``F`` (32-bit float): by the range the file declares —
     TIFF ``SMinSampleValue``/``SMaxSampleValue``, else an unsigned TIFF's ``BitsPerSample``
     (0..2^b − 1), else a PNG's (an ``I`` PNG is a 16-bit one: 0..65535). A file that declares
     no range is judged by its values: ``I`` values within 0..255 are kept as they are (PIL's
     own convention for ``I`` → ``L``), within 0..65535 they are taken as 16-bit data;
     ``F`` values within 0..1 are taken as 0..1 (the float convention of numpy/scikit-image),
     within 0..255 as 8-bit values. Anything else (negative values, larger ones, NaN or
     infinity) cannot be mapped without guessing: :class:`UnreadableImage`.
   - Any transparency is **composited on white**: ``RGBA``, ``RGBa``, ``LA``, ``La``, ``PA``,
     and ``P``/``L``/``RGB``/16-bit grey with a transparent colour key (``info["transparency"]``).
     (``convert("RGB")`` would drop the alpha and show what lies under it, often black.)
   - ``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV`` → ``RGB`` by PIL's conversions
     (CMYK without its ICC profile: PIL's naive formula).
5. **Applies the EXIF orientation** (``ImageOps.exif_transpose``): a phone photo stored sideways
   with an Orientation tag comes out upright, as every viewer shows it, and ``size`` is that of
   the upright image.

Anything PIL cannot identify or fully load (not an image, a truncated file, a broken stream)
raises :class:`UnreadableImage` with PIL's reason. (PIL's global ``ImageFile.LOAD_TRUNCATED_IMAGES``
must stay ``False``, its default, or truncated files decode silently with grey fill.)

The returned image is an ``RGB`` image whose ``info`` holds only ``FULL_SIZE_KEY``: metadata of the
source (ICC profile, EXIF, transparency) no longer describes it. An ``RGB`` source is returned as
decoded, not copied, so a large photo is held once.

Typical use::

    try:
        image = decode_image(data)
    except ImageError as err:
        skipped[name] = skip_reason(err)   # "corrupt: ...", "too large (...)"
"""
from __future__ import annotations

import io
import re

import numpy as np
from PIL import ExifTags, Image, ImageFile, ImageOps

__all__ = [
    "DECODER_VERSION",
    "DEFAULT_MAX_PIXELS",
    "FULL_SIZE_KEY",
    "ImageError",
    "ImageTooLarge",
    "UnreadableImage",
    "decode_image",
    "skip_reason",
]

DEFAULT_MAX_PIXELS = 89_478_485
"""PIL's own default ``Image.MAX_IMAGE_PIXELS`` (1024·1024·1024 // 4 // 3, about 9459²)."""

DECODER_VERSION = 1
"""Bumped whenever :func:`decode_image` can return other pixels for the same bytes: artifacts
computed from decoded pixels (features, tags, eval-set sizes) should include it in their
fingerprints, so a cache built by an older decoder is not reused."""

FULL_SIZE_KEY = "full_size"
"""``image.info`` key: ``(width, height)`` of the image at full scale, upright (differs from
``image.size`` only when ``draft_size`` reduced the decoding)."""

_HIGH_BIT_GREY = ("I;16", "I;16B", "I;16L", "I;16N")
_WITH_ALPHA = ("RGBA", "RGBa", "LA", "La", "PA")
_TIFF_BITS_PER_SAMPLE, _TIFF_SAMPLE_FORMAT = 258, 339
_TIFF_SMIN_SAMPLE_VALUE, _TIFF_SMAX_SAMPLE_VALUE = 340, 341
_STREAM_REPR = re.compile(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>")
_PIL_BOMB_PIXELS = re.compile(r"\((\d+) pixels\) exceeds limit of (\d+)")


class ImageError(ValueError):
    """An image that cannot be used; ``kind`` names the category for reports."""

    kind = "corrupt"


class ImageTooLarge(ImageError):
    """The image's header declares more pixels than allowed; nothing was decoded."""

    kind = "too_large"

    def __init__(self, width: int | None, height: int | None, pixels: int, limit: int):
        size = f"{width}×{height} = " if width is not None else ""
        super().__init__(f"too large ({size}{pixels} pixels > limit {limit})")
        self.width, self.height, self.pixels, self.limit = width, height, pixels, limit


class UnreadableImage(ImageError):
    """PIL cannot open or fully load the data, or its values cannot be mapped to 8 bits.

    The message is the reason alone (e.g. ``"cannot identify image file"``,
    ``"image file is truncated (3 bytes not processed)"``).
    """

    kind = "corrupt"


def skip_reason(err: ImageError) -> str:
    """One short, human-readable reason to record for an image skipped because of ``err``:
    ``"too large (20000×20000 = 400000000 pixels > limit 89478485)"`` or
    ``"corrupt: cannot identify image file"``."""
    if isinstance(err, ImageTooLarge):
        return str(err)
    return f"{err.kind}: {err}"


def decode_image(
    data: bytes,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    draft_size: tuple[int, int] | None = None,
) -> Image.Image:
    """Decode stored image bytes to an 8-bit ``RGB`` image (see the module docstring).

    Args:
        data: the image file's bytes (any format PIL reads).
        max_pixels: refuse an image whose header declares more pixels than this
            (``None``: only PIL's own global guard applies).
        draft_size: ``(width, height)`` the caller needs at least; a JPEG is then decoded at
            the smallest DCT scale (1/1, 1/2, 1/4 or 1/8) that still covers it.

    Raises:
        ImageTooLarge: more than ``max_pixels`` pixels (checked before any pixel is decoded).
        UnreadableImage: PIL cannot identify or fully load the data, or ``I``/``F`` values
            without a declared range fall outside the ranges above.
    """
    if max_pixels is not None and (
        isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1
    ):
        raise ValueError(f"max_pixels must be None or a positive integer, got {max_pixels!r}")
    if draft_size is not None and not (
        len(draft_size) == 2 and all(isinstance(v, int) and v >= 1 for v in draft_size)
    ):
        raise ValueError(f"draft_size must be None or (width, height) >= 1, got {draft_size!r}")
    image = _open(data, max_pixels)
    full_size = image.size
    try:
        if draft_size is not None:
            image.draft(None, tuple(draft_size))
        image.load()  # frame 0: Image.open leaves a multi-frame image on its first frame
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, EOFError, ... here
        raise UnreadableImage(_pil_reason(err)) from err
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
        ImageOps.exif_transpose(image, in_place=True)  # keeps the attributes _to_rgb reads
        rgb = _to_rgb(image)
    except ImageError:
        raise
    except Exception as err:  # a broken EXIF block, a mode PIL cannot convert
        raise UnreadableImage(f"cannot bring mode {image.mode} to RGB: {_pil_reason(err)}") from err
    if orientation in (5, 6, 7, 8):  # these swap width and height
        full_size = full_size[::-1]
    rgb.info = {FULL_SIZE_KEY: full_size}
    return rgb


def _open(data: bytes, max_pixels: int | None) -> ImageFile.ImageFile:
    """``Image.open`` (header only), with the size checked against ``max_pixels``."""
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:  # beyond twice PIL's global limit
        raise _too_large_for_pil(data, err, max_pixels) from err
    except Exception as err:
        raise UnreadableImage(_pil_reason(err)) from err
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLarge(width, height, width * height, max_pixels)
    return image


def _too_large_for_pil(data: bytes, err: Exception, max_pixels: int | None) -> ImageTooLarge:
    """The :class:`ImageTooLarge` for an image PIL's own guard refused: the header's W×H, and
    our limit when the image exceeds it too, else PIL's."""
    match = _PIL_BOMB_PIXELS.search(str(err))
    pixels, pil_limit = (int(match[1]), int(match[2])) if match else (0, 0)
    size = _header_size(data)
    if size is not None:
        pixels = size[0] * size[1]
    limit = max_pixels if max_pixels is not None and pixels > max_pixels else pil_limit
    return ImageTooLarge(*(size or (None, None)), pixels, limit)


def _header_size(data: bytes) -> tuple[int, int] | None:
    """The size in an image header that ``Image.open`` refuses to return (it raises on a
    decompression bomb): ask the format plugins directly, as ``Image.open`` does. Only reads
    headers. ``None`` if no plugin identifies the data."""
    Image.init()
    prefix = data[:16]
    for name in Image.ID:
        factory, accept = Image.OPEN[name]
        try:
            accepted = accept(prefix) if accept is not None else True
            if isinstance(accepted, str) or not accepted:
                continue
            return factory(io.BytesIO(data), "").size
        except Exception:
            continue
    return None


def _pil_reason(err: Exception) -> str:
    """PIL's message without the in-memory stream's address (reports must be reproducible)."""
    message = _STREAM_REPR.sub("", str(err)).strip()
    return message or type(err).__name__


# --------------------------------------------------------------------------------------------
# Modes
# --------------------------------------------------------------------------------------------


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode → ``RGB``: high bit depths scaled, transparency composited on white."""
    mode = image.mode
    transparency = image.info.get("transparency")
    if mode in _HIGH_BIT_GREY or mode in ("I", "F"):
        values = np.asarray(image)
        grey = Image.fromarray(_to_uint8(values, image))
        if isinstance(transparency, int) and not isinstance(transparency, bool):
            alpha = np.where(values == transparency, 0, 255).astype(np.uint8)
            return _on_white(Image.merge("LA", (grey, Image.fromarray(alpha))))
        return grey.convert("RGB")
    if mode in _WITH_ALPHA or (transparency is not None and mode in ("P", "L", "RGB", "1")):
        return _on_white(image.convert("RGBA"))
    if mode == "RGB":
        return image  # already 8-bit RGB: no copy (a full-size copy doubles a large photo's peak memory)
    return image.convert("RGB")  # 1, L, P, RGBX, CMYK, YCbCr, LAB, HSV


def _on_white(image: Image.Image) -> Image.Image:
    """Composite an image with alpha on an opaque white background."""
    rgba = image.convert("RGBA")
    background = Image.new("RGB", rgba.size, (255, 255, 255))
    background.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
    return background


def _to_uint8(values: np.ndarray, image: Image.Image) -> np.ndarray:
    """A grey high-bit-depth array → uint8, following the module docstring's rules."""
    if image.mode in _HIGH_BIT_GREY:
        return _scale(values, 0.0, 65535.0)
    declared = _declared_range(image)
    if declared is not None:
        return _scale(values, *declared)
    if values.size == 0:
        return values.astype(np.uint8)
    if not np.all(np.isfinite(values)):
        raise UnreadableImage(f"{image.mode} image has NaN or infinite values")
    low, high = float(values.min()), float(values.max())
    if image.mode == "F" and low >= 0.0 and high <= 1.0:
        return _scale(values, 0.0, 1.0)
    if low >= 0.0 and high <= 255.0:
        return _scale(values, 0.0, 255.0)
    if image.mode == "I" and low >= 0 and high <= 65535:
        return _scale(values, 0.0, 65535.0)
    kind = "32-bit integer" if image.mode == "I" else "floating-point"
    raise UnreadableImage(
        f"{kind} pixel values span {low:g}..{high:g} and the file declares no range, "
        "so they cannot be mapped to 8 bits without guessing"
    )


def _declared_range(image: Image.Image) -> tuple[float, float] | None:
    """The value range an ``I`` or ``F`` image's file declares, if any."""
    if image.format == "PNG" and image.mode == "I":
        return 0.0, 65535.0  # PIL (before 10.x) opened 16-bit grey PNGs as I
    tags = getattr(image, "tag_v2", None)
    if tags is None:
        return None
    smin, smax = tags.get(_TIFF_SMIN_SAMPLE_VALUE), tags.get(_TIFF_SMAX_SAMPLE_VALUE)
    if smin is not None and smax is not None:
        low, high = _first(smin), _first(smax)
        if high > low:
            return float(low), float(high)
    bits, sample_format = tags.get(_TIFF_BITS_PER_SAMPLE), tags.get(_TIFF_SAMPLE_FORMAT, 1)
    if image.mode == "I" and bits is not None and _first(sample_format) == 1:
        return 0.0, float(2 ** int(_first(bits)) - 1)
    return None


def _first(value):
    """A TIFF tag value may be one number or one per sample."""
    return value[0] if isinstance(value, tuple) else value


def _scale(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map ``low..high`` linearly onto 0..255, rounding to nearest and clipping."""
    scaled = (values.astype(np.float64) - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
