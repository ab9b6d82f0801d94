"""The images behind a manifest: plain files, or members of WebDataset tar shards, read in place.

An image reference is a file path, `SHARD.tar#MEMBER` (img2dataset writes `KEY.jpg` + `KEY.json` (+ `KEY.txt`)
per sample) or `ARCHIVE.zip#MEMBER` (archives as downloaded, e.g. OSV-5M's `images/test/00.zip`). Shards are never unpacked: the first access to a shard reads its headers once (`read_shard_index`,
cached per process) and every later member is one seek + read, so `open_image` is cheap to call repeatedly,
e.g. from DataLoader workers. `iter_images` streams many rows, reading each shard once, front to back.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import tarfile
import warnings
import zipfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from PIL.JpegImagePlugin import JpegImageFile
from tqdm import tqdm

from geotoken.data.table import Manifest
from geotoken.errors import GeoTokenError
from geotoken.io import split_ref

IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".jfif",
    ".jpe",
    ".png",
    ".webp",
    ".avif",
    ".tif",
    ".tiff",
    ".bmp",
    ".gif",
)  # most used first
# iPhones' default format: decoded when pillow-heif is installed (the heic extra, `heif_support`)
HEIF_EXTENSIONS = (".heic", ".heif")
# camera formats PIL cannot decode (HEIC without pillow-heif, raw files need a raw converter): a folder scan
# says how many it left out, instead of silently geolocating only the JPEGs beside them
UNREADABLE_PHOTO_EXTENSIONS = (
    ".heic",
    ".heif",
    ".dng",
    ".cr2",
    ".cr3",
    ".nef",
    ".arw",
    ".raf",
    ".orf",
    ".rw2",
)
_SHARD_INDEX: dict[str, tuple[tuple[int, int], dict[str, tuple[int, int]]]] = {}
_ZIPS: dict[str, tuple[tuple[int, int, int], zipfile.ZipFile]] = {}


@functools.cache
def heif_support() -> bool:
    """Whether HEIC/HEIF photos decode here: `pillow-heif` (pip install 'geotoken[heic]') registers its opener
    with PIL, which then opens them like any format, EXIF GPS included."""
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


def photo_extensions() -> tuple[str, ...]:
    """The file extensions a folder scan takes: IMAGE_EXTENSIONS, and HEIF_EXTENSIONS where they decode."""
    return IMAGE_EXTENSIONS + HEIF_EXTENSIONS if heif_support() else IMAGE_EXTENSIONS


def is_heif(data: bytes) -> bool:
    """An ISO media file of a HEIF brand (HEIC, HEIF image and sequence), by its `ftyp` box."""
    return data[4:8] == b"ftyp" and data[8:12] in (
        b"heic",
        b"heix",
        b"heim",
        b"heis",
        b"hevc",
        b"hevx",
        b"mif1",
        b"msf1",
    )


HEIC_HINT = "pip install 'geotoken[heic]' (pillow-heif) to read HEIC/HEIF photos, or convert them to JPEG"


def is_zip(path: str) -> bool:
    return path.lower().endswith(".zip")


def open_zip(path: str | os.PathLike) -> zipfile.ZipFile:
    """A zip archive opened once per process (keyed by size and mtime, like shard indexes, and by process:
    a DataLoader worker forked from a parent that opened it must not share its file offset)."""
    key = os.path.abspath(path)
    try:
        st = os.stat(key)
    except OSError:
        raise GeoTokenError(f"{path}: archive not found") from None
    stamp = (st.st_size, st.st_mtime_ns, os.getpid())
    cached = _ZIPS.get(key)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    try:
        archive = zipfile.ZipFile(key)
    except (zipfile.BadZipFile, OSError) as exc:
        raise GeoTokenError(f"{path}: not a readable zip archive: {exc}") from None
    _ZIPS[key] = (stamp, archive)
    return archive


def archive_members(path: str | os.PathLike) -> list[str]:
    """The regular files of a tar shard or a zip archive, in archive order."""
    if is_zip(os.fspath(path)):
        return [i.filename for i in open_zip(path).infolist() if not i.is_dir()]
    return list(read_shard_index(path))


def read_shard_index(tar_path: str | os.PathLike) -> dict[str, tuple[int, int]]:
    """member name -> (byte offset of its data, size) for every regular file in an uncompressed tar.

    Cached per process and keyed by the file's size and mtime, so a rewritten shard is re-read."""
    key = os.path.abspath(tar_path)
    try:
        st = os.stat(key)
    except OSError:
        raise GeoTokenError(f"{tar_path}: shard not found") from None
    stamp = (st.st_size, st.st_mtime_ns)
    cached = _SHARD_INDEX.get(key)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    try:
        with tarfile.open(key, "r:") as tar:
            index = {m.name: (m.offset_data, m.size) for m in tar if m.isreg()}
    except (tarfile.TarError, EOFError) as exc:
        raise GeoTokenError(f"{tar_path}: not a readable uncompressed tar shard: {exc}") from None
    _SHARD_INDEX[key] = (stamp, index)
    return index


def read_bytes(ref: str) -> bytes:
    """The raw bytes behind an image reference (a file, or a tar member read with one seek)."""
    ref = os.fspath(ref)
    if not ref:
        raise GeoTokenError("no image reference (this manifest row has none)")
    if "://" in ref:
        raise GeoTokenError(
            f"{ref}: remote image references are not read directly; fetch them first (geotoken data download)"
        )
    path, member = split_ref(ref)
    if member is not None and is_zip(path):
        try:
            return open_zip(path).read(member)
        except KeyError:
            raise GeoTokenError(f"{ref}: no member {member!r} in archive {path}") from None
        except (zipfile.BadZipFile, OSError) as exc:
            raise GeoTokenError(f"{ref}: cannot read archive member: {exc}") from None
    if member is None:
        if os.path.exists(path) and not os.path.isfile(path):  # a FIFO or a device would block or never end
            raise GeoTokenError(f"{ref}: not a regular file (a folder, pipe or device), not an image")
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise GeoTokenError(f"{ref}: image file not found") from None
        except OSError as exc:
            raise GeoTokenError(f"{ref}: cannot read image file: {exc.strerror or exc}") from None
    span = read_shard_index(path).get(member)
    if span is None:
        raise GeoTokenError(f"{ref}: no member {member!r} in shard {path}")
    with open(path, "rb") as f:
        f.seek(span[0])
        data = f.read(span[1])
    if len(data) != span[1]:
        raise GeoTokenError(f"{ref}: shard is truncated ({len(data)} of {span[1]} bytes)")
    return data


def to_rgb(image: Image.Image) -> Image.Image:
    """EXIF orientation applied, then 8-bit RGB: what every backbone reads.

    PIL's `convert("RGB")` clips 16-bit, 32-bit and float greyscale at 255 (a 16-bit PNG turns white), so
    those are rescaled first: integer modes as 16-bit (divided by 257), float ones as 0..1 (times 255) when
    they fit there, else as 0..255. An EXIF block that cannot be read keeps the stored orientation: the
    pixels are fine, only a metadata tag is broken."""
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 (struct.error, SyntaxError, KeyError, ... from a malformed EXIF block)
        pass
    if image.mode.startswith("I") or image.mode == "F":
        a = np.asarray(image, dtype=np.float64)
        if image.mode == "F" and np.isfinite(a).all() and a.size and a.min() >= 0 and a.max() <= 1:
            a = a * 255
        elif image.mode != "F":
            a = a / 257
        image = Image.fromarray(np.clip(np.nan_to_num(a), 0, 255).round().astype(np.uint8))
    return image.convert("RGB")


# JPEGs above this many pixels are decoded at a reduced scale (libjpeg's DCT scaling, 1/2 to 1/8) that
# keeps the short side at least LARGE_JPEG_SIDE: a 200 MP panorama decodes in ~40 MB instead of 600 MB,
# and is not refused by PIL's decompression-bomb limit (178 MP). Backbones read 224-448 px crops, so the
# answer does not change; photos below the threshold decode in full, exactly as before.
LARGE_JPEG_PIXELS = 64_000_000
LARGE_JPEG_SIDE = 2048
MAX_JPEG_PIXELS = 4_000_000_000  # even reduced 8x, beyond this a "photo" is a bomb


def _open_any(data: bytes) -> Image.Image:
    """`Image.open`, except that a JPEG over PIL's pixel limit is opened directly (it is decoded reduced)."""
    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        if data[:2] != b"\xff\xd8":
            raise
        return JpegImageFile(io.BytesIO(data))


def decode_image(data: bytes, ref: str = "<bytes>") -> Image.Image:
    """Fully decode image bytes to RGB (EXIF orientation applied); corrupt or truncated data -> GeoTokenError.
    A JPEG over LARGE_JPEG_PIXELS is decoded at a reduced scale (see there)."""
    if not data:
        raise GeoTokenError(f"{ref}: cannot decode image: the file is empty (0 bytes)")
    if data[257:262] == b"ustar" or data[:4] == b"PK\x03\x04":  # tar / zip signatures
        raise GeoTokenError(
            f"{ref}: an archive, not a photo: name a member as {ref}#MEMBER (e.g. {ref}#photos/a.jpg)"
        )
    if is_heif(data) and not heif_support():
        raise GeoTokenError(f"{ref}: cannot decode image: a HEIC/HEIF photo; {HEIC_HINT}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with _open_any(data) as im:
                w, h = im.size
                if im.format == "JPEG" and w * h > LARGE_JPEG_PIXELS:
                    if w * h > MAX_JPEG_PIXELS:
                        raise GeoTokenError(
                            f"{ref}: cannot decode image: {w} x {h} px is over {MAX_JPEG_PIXELS:,} pixels"
                        )
                    k = LARGE_JPEG_SIDE / min(w, h)
                    im.draft("RGB", (max(1, round(w * k)), max(1, round(h * k))))
                im.load()
                return to_rgb(im)
    except UnidentifiedImageError:
        raise GeoTokenError(
            f"{ref}: cannot decode image: not a known image format (starts {data[:8]!r})"
        ) from None
    except Image.DecompressionBombError as exc:  # PIL's limit; only JPEGs decode reduced (above)
        raise GeoTokenError(
            f"{ref}: cannot decode image: {exc.args[0].split(' could be')[0]}, over the limit of "
            f"{Image.MAX_IMAGE_PIXELS:,} pixels for formats other than JPEG (convert it to JPEG)"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise GeoTokenError(f"{ref}: cannot decode image: {exc}") from None


def open_image(ref: str | os.PathLike) -> Image.Image:
    """An image reference -> decoded RGB PIL image. Missing, corrupt or truncated -> GeoTokenError naming `ref`."""
    ref = os.fspath(ref)
    return decode_image(read_bytes(ref), ref)


def as_image(source, name: str = "image") -> Image.Image:
    """One photo in any of the forms people pass -> RGB PIL image, EXIF orientation applied.

    source: a path (str / PathLike, or SHARD.tar#MEMBER), encoded bytes (JPEG, PNG, ...), a PIL image, or a
    NumPy array (H, W), (H, W, 3) or (H, W, 4) of uint8, or of floats in [0, 1]. `name` names it in errors.
    """
    if isinstance(source, Image.Image):
        return to_rgb(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return decode_image(bytes(source), name)
    if isinstance(source, (str, os.PathLike)):
        return open_image(source)
    if isinstance(source, np.ndarray):
        return _array_image(source, name)
    raise GeoTokenError(
        f"{name}: expected a path, bytes, a PIL image or a NumPy array, got {type(source).__name__}"
    )


def image_key(image: Image.Image) -> int:
    """A photo's sampling key (`search.decode.row_uniforms`): a 64-bit hash of its size, mode and a 64 x 64
    nearest-pixel thumbnail (microseconds, even for a large photo), so the same photo gets the same
    samples wherever it is in a list, in every batch and through the server."""
    thumb = image.resize((64, 64), Image.Resampling.NEAREST).tobytes()
    digest = hashlib.blake2b(f"{image.size} {image.mode}".encode() + thumb, digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def as_image_list(images) -> list:
    """A list of photos for `as_image`: one photo (a path, bytes, a PIL image, an (H, W[, C]) array) becomes
    a list of one, an (N, H, W, C) array a list of N arrays, any other iterable a list (items not read yet)."""
    if isinstance(images, (str, bytes, bytearray, memoryview, os.PathLike, Image.Image)):
        return [images]
    if isinstance(images, np.ndarray):
        return list(images) if images.ndim == 4 else [images]
    if images is None or isinstance(images, dict) or not hasattr(images, "__iter__"):
        raise GeoTokenError(
            f"expected photos (a path, bytes, a PIL image, an array, or a list of them), got {type(images).__name__}"
        )
    return list(images)


def list_images(sources: Iterable[str | os.PathLike]) -> list[str]:
    """Photo arguments -> image references: a folder stands for every image file under it (recursively,
    extensions `photo_extensions()` in any case, sorted by path, hidden files and folders skipped); anything
    else (a file, SHARD.tar#MEMBER) is kept as given. A folder without images -> GeoTokenError."""
    out: list[str] = []
    readable = photo_extensions()
    for source in sources:
        ref = os.fspath(source)
        if not os.path.isdir(ref):
            out.append(ref)
            continue
        found, unreadable, seen = [], Counter(), set()
        for root, dirs, files in os.walk(ref, followlinks=True):  # a linked folder is part of the tree
            real = os.path.realpath(root)
            if real in seen:  # a link back up the tree (or twice to one folder): walked once
                dirs[:] = []
                continue
            seen.add(real)
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for f in files:
                ext = os.path.splitext(f)[1].lower()
                if not f.startswith(".") and ext in readable and os.path.isfile(os.path.join(root, f)):
                    found.append(os.path.join(root, f))
                elif ext in UNREADABLE_PHOTO_EXTENSIONS and ext not in readable:
                    unreadable[ext] += 1
                elif ext in readable and not os.path.exists(os.path.join(root, f)):
                    unreadable["broken link"] += 1  # a symlink to nothing
        broken = unreadable.pop("broken link", 0)
        if unreadable:
            kinds = ", ".join(f"{n} {ext}" for ext, n in sorted(unreadable.items()))
            hint = (
                HEIC_HINT
                if set(unreadable) & set(HEIF_EXTENSIONS)
                else "convert them to JPEG to geolocate them"
            )
            warnings.warn(f"{ref}: left out {kinds} photo(s), a format this install cannot decode; {hint}",
                          stacklevel=2)  # fmt: skip
        if broken:
            warnings.warn(f"{ref}: left out {broken} image link(s) that point to nothing", stacklevel=2)
        if not found:
            raise GeoTokenError(f"{ref}: no image files ({', '.join(readable)}) in this folder")
        out += sorted(found)
    return out


def _array_image(array: np.ndarray, name: str) -> Image.Image:
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)) or 0 in array.shape:
        raise GeoTokenError(
            f"{name}: an image array must be (H, W), (H, W, 3) or (H, W, 4), got {array.shape}"
        )
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.floating):
            raise GeoTokenError(f"{name}: an image array must be uint8 or float in [0, 1], got {array.dtype}")
        if not (np.isfinite(array).all() and array.min() >= 0 and array.max() <= 1):
            raise GeoTokenError(f"{name}: a float image array must hold values in [0, 1]")
        array = np.round(array * 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(array)).convert("RGB")


def _dms_degrees(value, ref) -> float | None:
    """EXIF (degrees, minutes, seconds) + N/S/E/W reference -> signed degrees (None if malformed)."""
    try:
        d, m, s = (float(x) for x in value)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    ref = (ref.decode("ascii", "replace") if isinstance(ref, bytes) else str(ref or "")).strip().upper()
    if ref not in ("N", "S", "E", "W"):  # without its hemisphere a coordinate may have the wrong sign
        return None
    degrees = d + m / 60 + s / 3600
    return -degrees if ref in ("S", "W") else degrees


def exif_gps(image: Image.Image | bytes) -> tuple[float, float] | None:
    """(lat, lon) degrees from a photo's EXIF GPS tags, or None when it has none (or they are malformed).

    image: a PIL image as opened or decoded here (`open_image` keeps the EXIF), or the file's bytes."""
    try:
        if isinstance(image, (bytes, bytearray, memoryview)):
            if is_heif(bytes(image[:16])):
                heif_support()
            with Image.open(io.BytesIO(bytes(image))) as im:
                exif = im.getexif()
        else:
            exif = image.getexif()
        gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError):
        return None
    if not gps:
        return None
    lat = _dms_degrees(gps.get(ExifTags.GPS.GPSLatitude), gps.get(ExifTags.GPS.GPSLatitudeRef))
    lon = _dms_degrees(gps.get(ExifTags.GPS.GPSLongitude), gps.get(ExifTags.GPS.GPSLongitudeRef))
    if lat is None or lon is None or not (abs(lat) <= 90 and abs(lon) <= 180):
        return None
    if lat == lon == 0:  # what many cameras write when they have no fix
        return None
    return round(lat, 6), round(lon, 6)  # ~0.1 m; no float noise in outputs


def _references(source: Manifest | Sequence[str]) -> np.ndarray:
    return source.images if isinstance(source, Manifest) else np.asarray(source, dtype=np.str_)


def iter_images(
    source: Manifest | Sequence[str], rows: Iterable[int] | None = None, *, decode: bool = True
) -> Iterator[tuple[int, Image.Image | bytes | GeoTokenError]]:
    """Yield (row, RGB image) for the selected rows, or (row, GeoTokenError) for a row that cannot be read.

    Order: plain files in row order, then each shard (in order of first appearance) with its rows in the order
    their members lie in the file, so every shard is opened once and read front to back. decode=False yields
    the raw bytes instead of images (for hashing or copying)."""
    refs = _references(source)
    rows = np.arange(len(refs)) if rows is None else np.fromiter(rows, dtype=np.int64)
    shards: dict[str, list[tuple[int, str]]] = {}
    for row in rows.tolist():
        ref = str(refs[row])
        path, member = split_ref(ref)
        if member is None or is_zip(path):
            try:
                data = read_bytes(ref)
                yield row, decode_image(data, ref) if decode else data
            except GeoTokenError as exc:
                yield row, exc
        else:
            shards.setdefault(path, []).append((row, member))
    for path, members in shards.items():
        try:
            index = read_shard_index(path)
        except GeoTokenError as exc:
            for row, _ in members:
                yield row, exc
            continue
        missing = [(row, m) for row, m in members if m not in index]
        for row, m in missing:
            yield row, GeoTokenError(f"{path}#{m}: no member {m!r} in shard {path}")
        present = sorted((index[m][0], row, m) for row, m in members if m in index)
        with open(path, "rb") as f:
            for offset, row, m in present:
                ref = f"{path}#{m}"
                f.seek(offset)
                data = f.read(index[m][1])
                if len(data) != index[m][1]:
                    yield (
                        row,
                        GeoTokenError(f"{ref}: shard is truncated ({len(data)} of {index[m][1]} bytes)"),
                    )
                    continue
                try:
                    yield row, decode_image(data, ref) if decode else data
                except GeoTokenError as exc:
                    yield row, exc


def check_images(
    source: Manifest | Sequence[str], rows=None, *, decode: bool = False
) -> Iterator[tuple[int, str]]:
    """Yield (row, reason) for every selected row whose image is missing (or, with decode, unreadable)."""
    refs = _references(source)
    rows = np.arange(len(refs)) if rows is None else np.fromiter(rows, dtype=np.int64)
    bar = tqdm(
        total=len(rows), desc="checking images", unit="img", disable=None if len(rows) > 2000 else True
    )
    with bar:
        if decode:
            for row, result in iter_images(refs, rows):
                bar.update()
                if isinstance(result, Exception):
                    yield row, str(result)
            return
        for row in rows.tolist():
            bar.update()
            ref = str(refs[row])
            path, member = split_ref(ref)
            if not ref:
                yield row, "no image reference"
            elif "://" in ref:
                yield row, f"{ref}: remote image reference (fetch it first)"
            elif member is None:
                if not os.path.isfile(path):
                    yield row, f"{ref}: image file not found"
            elif is_zip(path):
                try:
                    open_zip(path).getinfo(member)
                except KeyError:
                    yield row, f"{ref}: no member {member!r} in archive {path}"
                except GeoTokenError as exc:
                    yield row, str(exc)
            else:
                try:
                    if member not in read_shard_index(path):
                        yield row, f"{ref}: no member {member!r} in shard {path}"
                except GeoTokenError as exc:
                    yield row, str(exc)


def shard_samples(tar_path: str | os.PathLike) -> dict[str, dict[str, str]]:
    """key -> {extension: member name} for an img2dataset shard (e.g. {'000001': {'jpg': ..., 'json': ...}})."""
    samples: dict[str, dict[str, str]] = {}
    for name in read_shard_index(tar_path):
        key, dot, ext = name.rpartition(".")
        if dot:
            samples.setdefault(key, {})[ext.lower()] = name
    return samples
