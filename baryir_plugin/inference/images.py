"""Reading users' images and writing their restorations with the same size, bit depth, channels and format.

- The bit depth is decided by the file's sample type, never by its pixel values: a dark 16-bit photo stays
  16-bit (uint8 -> /255, uint16 -> /65535, float32 TIFF/EXR taken as [0, 1]).
- Grey in, grey out (the network sees it as three equal channels; the output is their luminance).
- An alpha channel is passed through unchanged, sample for sample.
- EXIF orientation is applied (the output is stored upright, with no orientation tag), and said.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import cv2
import numpy as np

from ..errors import DataError

__all__ = ['IMAGE_EXTENSIONS', 'Picture', 'list_inputs', 'read_picture', 'write_picture']

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.tif', '.tiff', '.bmp', '.webp', '.ppm', '.pgm', '.pnm')
_SCALE = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}
# formats that store each sample type (cv2.imwrite)
_WRITES = {np.dtype(np.uint8): IMAGE_EXTENSIONS,
           np.dtype(np.uint16): ('.png', '.tif', '.tiff', '.ppm', '.pgm', '.pnm'),
           np.dtype(np.float32): ('.tif', '.tiff', '.exr')}
_ALPHA = ('.png', '.tif', '.tiff', '.webp', '.exr')  # formats that store an alpha channel
# EXIF orientation -> (rotation k of np.rot90, counter-clockwise; flip left-right first)
_ORIENTATION = {2: (0, True), 3: (2, False), 4: (2, True), 5: (3, True), 6: (3, False), 7: (1, True), 8: (1, False)}


@dataclass
class Picture:
    """An image ready for the network: ``rgb`` float32 (H, W, 3) in [0, 1] (RGB order), and what is
    needed to write the restoration like the input."""
    path: str
    rgb: np.ndarray
    dtype: np.dtype
    grey: bool
    alpha: Optional[np.ndarray] = None  # the input's alpha samples, untouched
    notes: list = field(default_factory=list)

    @property
    def megapixels(self) -> float:
        return self.rgb.shape[0] * self.rgb.shape[1] / 1e6


def list_inputs(path: str) -> list[str]:
    """The image files of ``-i``: the file itself, or a folder's images (sorted, not recursive)."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise DataError(f'-i {path}: no such file or folder (relative to {os.getcwd()}).')
    names = sorted(n for n in os.listdir(path) if not n.startswith('.')
                   and os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS
                   and os.path.isfile(os.path.join(path, n)))
    if not names:
        raise DataError(f'-i {path}: the folder holds no images ({", ".join(IMAGE_EXTENSIONS)}).')
    return [os.path.join(path, n) for n in names]


def _header(path: str) -> tuple[int, str]:
    """The EXIF orientation (1: as stored) and Pillow's mode of the file ('' where Pillow cannot read it)."""
    try:
        from PIL import Image
        with Image.open(path) as im:
            return int(im.getexif().get(0x0112, 1) or 1), im.mode
    except Exception:  # noqa: BLE001 (no EXIF, or a format Pillow does not read: stored as is)
        return 1, ''


def _decode_quietly(data: np.ndarray):
    """cv2.imdecode without OpenCV's own warning lines (a broken file is reported once, by name, instead)."""
    logging = getattr(cv2, 'utils', None) and getattr(cv2.utils, 'logging', None)
    if logging is None:
        return cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    previous = logging.getLogLevel()
    logging.setLogLevel(logging.LOG_LEVEL_ERROR)
    try:
        return cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    finally:
        logging.setLogLevel(previous)


def read_picture(path: str) -> Picture:
    """Read ``path`` (8/16-bit or float, grey, RGB or with alpha) into a :class:`Picture`."""
    data = np.fromfile(path, dtype=np.uint8) if os.path.isfile(path) else None
    if data is None:
        raise DataError(f'{path}: no such file.')
    img = _decode_quietly(data) if data.size else None
    if img is None:
        raise DataError(f'{path}: not a readable image (empty, truncated or not an image file).')
    if img.dtype not in _SCALE and img.dtype != np.float32:
        raise DataError(f'{path}: {img.dtype} samples are not supported; give 8- or 16-bit integer or float32 images.')
    notes = []
    if img.dtype == np.uint16:
        notes.append('16-bit')
    orientation, mode = _header(path)
    if orientation in _ORIENTATION:
        k, flip = _ORIENTATION[orientation]
        if flip:
            img = img[:, ::-1]
        img = np.rot90(img, k)
        notes.append(f'EXIF orientation {orientation} applied (stored upright)')
    if img.ndim == 2:
        img = img[..., None]
    channels = img.shape[2]
    alpha = None
    if channels in (2, 4):
        alpha = np.ascontiguousarray(img[..., -1])
        img = img[..., :-1]
        notes.append('alpha passed through')
        if mode in ('LA', 'La') and img.shape[2] == 3:  # OpenCV reads grey + alpha as BGRA
            img = img[..., :1]
    grey = img.shape[2] == 1
    scale = _SCALE.get(img.dtype, 1.0)
    values = img.astype(np.float32) / scale
    rgb = np.repeat(values, 3, axis=2) if grey else values[..., ::-1]
    if not np.isfinite(rgb).all():
        raise DataError(f'{path}: holds NaN or infinite samples.')
    return Picture(path, np.ascontiguousarray(np.clip(rgb, 0, 1)), img.dtype, grey, alpha, notes)


def output_extension(picture: Picture, ext: str) -> str:
    """The output's extension: the input's (``auto``) or ``ext``; a format that cannot hold the input's
    sample type is a DataError naming one that can."""
    out = os.path.splitext(picture.path)[1].lower() if ext == 'auto' else '.' + ext.lower().lstrip('.')
    if out not in _WRITES[np.dtype(picture.dtype)]:
        bits = {np.dtype(np.uint8): '8-bit', np.dtype(np.uint16): '16-bit', np.dtype(np.float32): 'float'}
        choices = ', '.join(e.lstrip('.') for e in _WRITES[np.dtype(picture.dtype)][:3])
        raise DataError(f'{picture.path}: a {bits[np.dtype(picture.dtype)]} image cannot be written as {out}; give '
                        f'--ext {choices.split(", ")[0]} (or one of {choices}).')
    if picture.alpha is not None and out not in _ALPHA:
        raise DataError(f'{picture.path}: it has an alpha channel, which {out} cannot store; give --ext png (or tif, '
                        'webp).')
    return out


def to_samples(picture: Picture, rgb: np.ndarray) -> np.ndarray:
    """The restored RGB float (H, W, 3) as the input's sample type, channel order, grey and alpha."""
    rgb = np.clip(rgb, 0, 1).astype(np.float32)
    if picture.grey:
        img = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)[..., None]
    else:
        img = rgb[..., ::-1]
    scale = _SCALE.get(np.dtype(picture.dtype))
    if scale is not None:
        img = np.round(img * scale).astype(picture.dtype)
    if picture.alpha is not None:
        img = np.concatenate([img, picture.alpha[..., None].astype(img.dtype)], axis=2)
    return np.ascontiguousarray(img[..., 0] if img.shape[2] == 1 else img)


def write_picture(path: str, picture: Picture, rgb: np.ndarray, jpeg_quality: int = 95) -> None:
    """Write the restoration atomically (a temporary file renamed over ``path``)."""
    from ..compat import atomic_write

    img = to_samples(picture, rgb)
    ext = os.path.splitext(path)[1].lower()
    if img.ndim == 3 and img.shape[2] == 2:  # grey + alpha: OpenCV writes 1, 3 or 4 channels only
        if ext == '.png' and img.dtype == np.uint8:
            import io

            from PIL import Image
            buffer = io.BytesIO()
            Image.fromarray(img, 'LA').save(buffer, format='PNG')
            encoded = np.frombuffer(buffer.getvalue(), dtype=np.uint8)
            atomic_write(path, lambda f: f.write(encoded.tobytes()))
            return
        img = np.ascontiguousarray(img[..., [0, 0, 0, 1]])  # stored as BGRA with three equal channels
    params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality] if ext in ('.jpg', '.jpeg') else []
    try:
        ok, encoded = cv2.imencode(ext, img, params)
    except cv2.error as e:
        raise DataError(f'{path}: OpenCV cannot encode this image as {ext} ({" ".join(str(e).split())[-120:]}).') \
            from None
    if not ok:
        raise DataError(f'{path}: OpenCV cannot encode this image as {ext}.')

    def write(f):
        f.write(encoded.tobytes())

    atomic_write(path, write)
