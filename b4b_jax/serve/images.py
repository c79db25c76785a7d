"""Untrusted image payloads -> uint8 [N, S, S, 3] at the encoder's input size, or a RequestError.

Accepted bodies of `POST /v1/embeddings` (the app hands the raw parts here):
  * PNG or JPEG files (multipart form fields, base64 strings in JSON, or one raw image body). Each is
    checked before decoding: the format from its magic bytes, the pixel count from the header only
    (the format's PIL class parses the header lazily; decompression bombs are refused before any pixel
    is inflated, by limits.max_image_pixels alone, and no process-wide warning state is touched), 8-bit
    depth (16-bit PNGs are refused, not silently truncated), and the colour mode (L, P, RGB, RGBA, LA,
    PA and 1-bit convert to RGB explicitly, alpha dropped; CMYK and other modes are refused). Decoded
    images go through the encoder manifest's geometry: the shorter side resized to `resize` (or to
    `input_size` when the manifest has none) with PIL's antialiased filter, then a centre crop of
    `input_size`.
  * A uint8 npy array [N, S, S, 3] (or [S, S, 3]) already at the input size, for bulk: its header is read
    and checked (dtype, rank, channels, size, row count, byte count) before the data is touched.
Normalisation (mean/std) is not done here: the defended encoder takes uint8 images and normalises inside.
"""
import io
import threading
from typing import Dict, List, Sequence

import numpy as np
from PIL import Image
from PIL import JpegImagePlugin
from PIL import PngImagePlugin

from b4b_jax.serve import errors

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
_RGB_CONVERTIBLE = {"1", "L", "P", "RGB", "RGBA", "LA", "PA", "La", "RGBa"}
_FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
# The format's own PIL class, not Image.open: Image.open also applies PIL's process-wide bomb check
# (Image.MAX_IMAGE_PIXELS), which *warns* between 89 M and 179 M pixels. Turning that warning into an
# error needs warnings.catch_warnings(), which swaps the interpreter-wide filter list and is not
# thread-safe: request threads entering and leaving it out of order left another thread's "error"
# filter installed for good (a provider's whole process then had PIL's warning raised as an error), and
# each distinct warning text that does get through adds an entry to PIL's warning registry, without
# bound under a flood of forged headers. Here the header is parsed by the class alone, and
# limits.max_image_pixels (checked from that header, before any pixel is inflated) is the one bomb
# guard, whatever Image.MAX_IMAGE_PIXELS says. JpegImageFile reads an MPO (multi-picture JPEG) as its
# first picture.
_OPENERS = {"PNG": PngImagePlugin.PngImageFile, "JPEG": JpegImagePlugin.JpegImageFile}
# numpy parses an npy header with `ast.literal_eval`, and CPython 3.11's AST conversion keeps its recursion
# depth in interpreter-wide state: two request threads parsing at once can interleave and fail with
# "SystemError: AST constructor recursion depth mismatch" (CPython gh-106905), which a good body would
# then be refused for. One parse at a time; a header is at most a few hundred bytes (microseconds).
_NPY_HEADER_LOCK = threading.Lock()


class Limits:
  """Request bounds (from config.limits)."""

  def __init__(self, *, max_request_bytes: int, max_rows_per_request: int, max_image_pixels: int,
               max_image_bytes: int):
    self.max_request_bytes = int(max_request_bytes)
    self.max_rows_per_request = int(max_rows_per_request)
    self.max_image_pixels = int(max_image_pixels)
    self.max_image_bytes = int(max_image_bytes)

  @classmethod
  def from_config(cls, limits) -> "Limits":
    return cls(max_request_bytes=limits.max_request_bytes,
               max_rows_per_request=limits.max_rows_per_request,
               max_image_pixels=limits.max_image_pixels, max_image_bytes=limits.max_image_bytes)


class Geometry:
  """What the encoder's manifest says an input image must become (size, resize rule, filter)."""

  def __init__(self, preprocessing: Dict):
    self.input_size = int(preprocessing["input_size"])
    resize = preprocessing.get("resize")
    self.resize = self.input_size if resize is None else int(resize)
    interpolation = preprocessing.get("interpolation", "bilinear")
    if interpolation not in _FILTERS:
      raise ValueError(f"manifest interpolation {interpolation!r} not in {sorted(_FILTERS)}")
    self.filter = _FILTERS[interpolation]

  def apply(self, image: Image.Image) -> np.ndarray:
    s = self.input_size
    w, h = image.size
    if (w, h) != (s, s):
      scale = self.resize / min(w, h)
      new = (max(s, round(w * scale)), max(s, round(h * scale)))
      if new != (w, h):
        image = image.resize(new, self.filter)
      w, h = image.size
      left, top = int(round((w - s) / 2.0)), int(round((h - s) / 2.0))
      image = image.crop((left, top, left + s, top + s))
    return np.asarray(image, np.uint8)


def _png_bit_depth(data: bytes) -> int:
  # IHDR is the first chunk: 8 signature + 4 length + 4 type + 4 width + 4 height, then the bit depth.
  return data[24] if len(data) > 24 and data[12:16] == b"IHDR" else -1


def decode_image(data: bytes, geometry: Geometry, limits: Limits, index: int) -> np.ndarray:
  """One PNG/JPEG file -> uint8 [S, S, 3] (see the module docstring), or RequestError naming image i."""
  what = f"image {index}"
  if not data:
    raise errors.unprocessable("empty_image", f"{what} is empty (0 bytes)")
  if len(data) > limits.max_image_bytes:
    raise errors.too_large("image_too_large", f"{what} has {len(data)} bytes; the limit is "
                           f"{limits.max_image_bytes} bytes per image")
  if data.startswith(PNG_MAGIC):
    fmt = "PNG"
    if _png_bit_depth(data) == 16:
      raise errors.unprocessable("unsupported_bit_depth", f"{what} is a 16-bit PNG; send 8 bits per "
                                 "channel (16-bit images are refused rather than silently truncated)")
  elif data.startswith(JPEG_MAGIC):
    fmt = "JPEG"
  else:
    raise errors.unprocessable("unsupported_image_format", f"{what} is neither PNG nor JPEG (first "
                               f"bytes {data[:8]!r})")
  try:
    image = _OPENERS[fmt](io.BytesIO(data))
    w, h = image.size  # header only: nothing inflated yet
    if w < 1 or h < 1 or w * h > limits.max_image_pixels:
      raise errors.too_large("image_too_many_pixels", f"{what} is {w}x{h} = {w * h} pixels; the "
                             f"limit is {limits.max_image_pixels} pixels (decompression bomb guard)")
    mode = image.mode
    if mode == "CMYK":
      raise errors.unprocessable("unsupported_color_mode", f"{what} is a CMYK {fmt}; send RGB or "
                                 "grayscale")
    if mode not in _RGB_CONVERTIBLE:
      raise errors.unprocessable("unsupported_color_mode", f"{what} has colour mode {mode!r} "
                                 "(16-bit or float?); send 8-bit RGB, RGBA, grayscale or palette")
    image.load()
  except errors.RequestError:
    raise
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, zlib.error... for bad files
    raise errors.unprocessable("corrupt_image", f"{what} is a truncated or corrupt {fmt}: {e}") from e
  if image.mode != "RGB":
    image = image.convert("RGBA").convert("RGB") if "A" in image.mode or image.mode == "P" else (
        image.convert("RGB"))
  return geometry.apply(image)


def decode_images(files: Sequence[bytes], geometry: Geometry, limits: Limits) -> np.ndarray:
  check_rows(len(files), limits)
  total = sum(len(f) for f in files)
  if total > limits.max_request_bytes:
    raise errors.too_large("request_too_large", f"the images hold {total} bytes; the limit is "
                           f"{limits.max_request_bytes}")
  return np.stack([decode_image(f, geometry, limits, i) for i, f in enumerate(files)])


def check_rows(n: int, limits: Limits) -> None:
  if n == 0:
    raise errors.unprocessable("no_images", "the request holds no images")
  if n > limits.max_rows_per_request:
    raise errors.too_large("too_many_images", f"the request holds {n} images; the limit is "
                           f"{limits.max_rows_per_request} per request (split it)")


def decode_npy(body: bytes, geometry: Geometry, limits: Limits) -> np.ndarray:
  """A uint8 npy array [N, S, S, 3] (or one image [S, S, 3]) -> uint8 [N, S, S, 3]."""
  if not body:
    raise errors.bad_request("empty_body", "the request body is empty; send a uint8 npy array")
  f = io.BytesIO(body)
  try:
    version = np.lib.format.read_magic(f)
    with _NPY_HEADER_LOCK:
      if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
      else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
  except Exception as e:  # bad magic, bad header dict, unsupported version
    raise errors.bad_request("malformed_npy", f"the body is not a valid npy file: {e}") from e
  s = geometry.input_size
  if dtype != np.uint8:
    raise errors.unprocessable("wrong_dtype", f"the npy array has dtype {dtype}; send uint8 pixels "
                               f"[N, {s}, {s}, 3] in 0..255")
  shape = tuple(int(v) for v in shape)
  if len(shape) == 3:
    shape = (1,) + shape
  if len(shape) != 4:
    raise errors.unprocessable("wrong_shape", f"the npy array has shape {shape}; expected [N, {s}, "
                               f"{s}, 3]")
  if shape[3] != 3:
    raise errors.unprocessable("wrong_channels", f"the images have {shape[3]} channels; expected 3 "
                               f"(RGB), shape [N, {s}, {s}, 3]")
  if shape[1:3] != (s, s):
    raise errors.unprocessable("wrong_image_size", f"the images are {shape[1]}x{shape[2]}; this "
                               f"encoder takes {s}x{s} (send PNG/JPEG to have them resized)")
  check_rows(shape[0], limits)
  expected = int(np.prod(shape))
  data = memoryview(body)[f.tell():]
  if len(data) != expected:
    raise errors.bad_request("truncated_npy", f"the npy array of shape {shape} needs {expected} data "
                             f"bytes, the body holds {len(data)}")
  out = np.frombuffer(data, np.uint8).reshape(shape, order="F" if fortran else "C")
  return np.ascontiguousarray(out)


def load_npy(body: bytes) -> np.ndarray:
  """npy bytes -> the array (the client's decoder), parsed under the header lock: clients call it from
  threads too."""
  with _NPY_HEADER_LOCK:
    return np.load(io.BytesIO(body), allow_pickle=False)


def encode_npy(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
  return buf.getvalue()


def encode_png(image: np.ndarray) -> bytes:
  """uint8 [H, W, 3] -> PNG bytes (the client's encoder for image uploads)."""
  buf = io.BytesIO()
  Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


def check_base64_list(items, limits: Limits) -> List[str]:
  if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
    raise errors.unprocessable("bad_json_images", "JSON field 'images' must be a list of base64 "
                               "strings (PNG or JPEG files)")
  check_rows(len(items), limits)
  return items
