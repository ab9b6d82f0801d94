"""Exact, vectorized S2 cell ids and hierarchical location tokens, in pure NumPy.

An S2 cell id (uint64) is `face (3 bits) | Hilbert position (2 bits per level) | 1 | zeros`. A point becomes
tokens by reading that id coarse to fine: token 0 is the cube face (0..5), then one child index (0..3) per
level. `group` consecutive child indices form one base-4 token (vocabulary 4**group), the first child being
the most significant digit, so grouped tokens keep the coarse-to-fine order. When `level % group != 0` the
last group is shorter and has the smaller vocabulary 4**(level % group): level 21, group 2 gives 12 tokens
with vocabularies [6, 16 x 10, 4]. So a sequence always has `1 + ceil(level / group)` tokens.

Exactness. Cell ids are bit-identical to the official s2geometry library. It maps lat/lon to a leaf cell as
    phi, theta = (pi/180) * lat, (pi/180) * lon            S1Angle::Degrees
    p = (cos(theta) cos(phi), sin(theta) cos(phi), sin(phi))  S2LatLng::ToPoint
    face = axis of largest |p_k| (+3 if negative); u, v = ratios of the other two components to it
    s = 0.5 sqrt(1 + 3u) if u >= 0 else 1 - 0.5 sqrt(1 - 3u)  quadratic projection, UVtoST
    i = min(floor(2**30 s), 2**30 - 1)                        STtoIJ
and then walks the Hilbert curve. Every step after the trigonometry is a correctly rounded IEEE operation,
which NumPy repeats in the same order. Only sin/cos can differ: the fast path uses `_sincos` (a table and a
short series, within 1e-15 of the exact values; NumPy's own SIMD sin/cos may also differ from the C
library's by a few ulp). That moves s by far less than `_ST_TOLERANCE`, so any point whose s or t lies
within that distance of a cell boundary at the requested level gets its sin/cos recomputed with
`math.sin`/`math.cos`: the C library that s2geometry calls. That is about 4 points in 1,000 at level 30 and
4 in a million at level 20, so the hot path stays vectorized.

The Hilbert walk uses lookup tables that advance `_LUT_LEVELS` levels at a time, like s2geometry's own.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from geotoken.errors import GeoTokenError

MAX_LEVEL = 30
NUM_FACES = 6
_POS_BITS = 2 * MAX_LEVEL + 1  # bits below the face: 60 position bits and the trailing 1
_DEG_TO_RAD = math.pi / 180  # S1Angle::Degrees multiplies by (M_PI / 180)
_RAD_TO_DEG = 180 / math.pi  # S1Angle::degrees multiplies by (180 / M_PI)
# Largest change of s (in [0, 1]) that an error of 1e-15 in sin/cos can cause (~5e-15), with a wide margin.
_ST_TOLERANCE = 1e-12
_CHUNK = 1 << 15  # points per vectorized block: keeps the temporaries in cache

# --- Hilbert curve tables ---------------------------------------------------------------------------------
# Orientation bits of a sub-square: SWAP exchanges i and j, INVERT walks the curve backwards.
_SWAP, _INVERT = 1, 2
# For each orientation, the (i << 1 | j) quadrant visited at curve position 0..3 (S2's kPosToIJ).
_POS_TO_IJ = np.array([[0, 1, 3, 2], [0, 2, 3, 1], [3, 2, 0, 1], [3, 1, 0, 2]], dtype=np.int64)
# How the orientation changes when descending into the child at position 0..3 (S2's kPosToOrientation).
_POS_TO_ORIENTATION = np.array([_SWAP, 0, 0, _INVERT | _SWAP], dtype=np.int64)
_LUT_LEVELS = 5  # 20 and 30 are multiples of 5: four or six table steps
_LUT_MASK = (1 << _LUT_LEVELS) - 1


def _build_luts(levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Tables that walk `levels` Hilbert levels in one gather (int32; L = levels, orientation 0..3).

    ij_to_pos[(orient << 2L) | (i << L) | j] = (pos << 2L + 2) | (orient_after << 2L)  (i, j: L bits; pos: 2L)
    pos_to_ij[(orient << 2L) | pos]          = (((i << L) | j) << 2L + 2) | (orient_after << 2L)
    The orientation comes out already shifted into place for the next step's index.
    """
    n = 1 << (2 * levels)
    orient0 = np.repeat(np.arange(4, dtype=np.int64), n)  # (4n,)
    pos = np.tile(np.arange(n, dtype=np.int64), 4)  # (4n,)
    orient, i, j = orient0.copy(), np.zeros_like(pos), np.zeros_like(pos)
    for k in range(levels - 1, -1, -1):  # coarse to fine
        digit = (pos >> (2 * k)) & 3
        ij = _POS_TO_IJ[orient, digit]
        i |= (ij >> 1) << k
        j |= (ij & 1) << k
        orient ^= _POS_TO_ORIENTATION[digit]
    ij_to_pos = np.empty(4 * n, dtype=np.int32)
    ij_to_pos[(orient0 << (2 * levels)) | (i << levels) | j] = (pos << (2 * levels + 2)) | (
        orient << (2 * levels)
    )
    pos_to_ij = (((i << levels) | j) << (2 * levels + 2)) | (
        orient << (2 * levels)
    )  # indexed by (orient0, pos)
    return ij_to_pos, pos_to_ij.astype(np.int32)


_IJ_TO_POS, _POS_TO_IJ_LUT = _build_luts(_LUT_LEVELS)
_ORIENT_BITS = 3 << (2 * _LUT_LEVELS)  # where a table entry keeps the next orientation
_ENTRY_SHIFT = 2 * _LUT_LEVELS + 2  # where a table entry keeps its payload


def _steps(level: int) -> tuple[int, int]:
    """Table steps for `level` levels, and the padding levels added at the bottom to fill the last step."""
    steps = -(-level // _LUT_LEVELS)
    return steps, steps * _LUT_LEVELS - level


def _hilbert_pos(face: np.ndarray, i: np.ndarray, j: np.ndarray, level: int) -> np.ndarray:
    """Hilbert position (2*level bits, int64) of level-`level` cell (i, j) (int32) on `face`."""
    steps, pad = _steps(level)
    i, j = i << pad, j << pad  # at most 30 bits: still int32
    orient = ((face & _SWAP) << (2 * _LUT_LEVELS)).astype(np.int32)  # odd faces start swapped
    pos = np.zeros(i.shape, dtype=np.int64)
    for step in range(steps - 1, -1, -1):  # coarse to fine
        shift = step * _LUT_LEVELS
        # index = orient | i's 5 bits << 5 | j's 5 bits, with two int32 ops per coordinate
        i_bits = (i >> (shift - _LUT_LEVELS)) if shift else (i << _LUT_LEVELS)
        key = orient | (i_bits & (_LUT_MASK << _LUT_LEVELS)) | ((j >> shift) & _LUT_MASK)
        entry = _IJ_TO_POS[key]
        pos = (pos << (2 * _LUT_LEVELS)) | (entry >> _ENTRY_SHIFT)
        orient = entry & _ORIENT_BITS
    return pos >> (2 * pad)


def _hilbert_ij(face: np.ndarray, pos: np.ndarray, level: int) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of `_hilbert_pos`: (i, j), int64 with `level` bits each."""
    steps, pad = _steps(level)
    pos = pos << (2 * pad)
    orient = (face & _SWAP) << (2 * _LUT_LEVELS)
    i = np.zeros(pos.shape, dtype=np.int64)
    j = np.zeros(pos.shape, dtype=np.int64)
    for step in range(steps - 1, -1, -1):
        entry = _POS_TO_IJ_LUT[orient | ((pos >> (2 * _LUT_LEVELS * step)) & ((1 << 2 * _LUT_LEVELS) - 1))]
        i = (i << _LUT_LEVELS) | (entry >> (_ENTRY_SHIFT + _LUT_LEVELS))
        j = (j << _LUT_LEVELS) | ((entry >> _ENTRY_SHIFT) & _LUT_MASK)
        orient = entry & _ORIENT_BITS
    return i >> pad, j >> pad


# --- checks -----------------------------------------------------------------------------------------------
def _where(index: int, shape: tuple[int, ...]) -> str:
    """Index of the flat position `index` as the caller sees it: 7, or (2, 3) for 2-D input."""
    if len(shape) <= 1:
        return str(index)
    return str(tuple(int(k) for k in np.unravel_index(index, shape)))


def _check_level(level, name: str = "level") -> int:
    if isinstance(level, bool) or not isinstance(level, int | np.integer) or not 0 <= level <= MAX_LEVEL:
        raise GeoTokenError(f"{name} = {level!r} must be an integer in 0..{MAX_LEVEL}")
    return int(level)


def _check_group(group) -> int:
    if isinstance(group, bool) or not isinstance(group, int | np.integer) or not 1 <= group <= MAX_LEVEL:
        raise GeoTokenError(
            f"group size (child indices per token) {group!r} must be an integer in 1..{MAX_LEVEL}"
        )
    return int(group)


def _latlon_arrays(lat, lon) -> tuple[np.ndarray, np.ndarray]:
    """float64 copies of lat/lon, validated; longitudes outside [-180, 180] wrapped into [-180, 180)."""
    try:
        lat = np.asarray(lat, dtype=np.float64)
        lon = np.asarray(lon, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise GeoTokenError(f"lat/lon must be numbers: {exc}") from None
    if lat.shape != lon.shape:
        raise GeoTokenError(f"lat has shape {lat.shape} but lon has shape {lon.shape}; they must match")
    bad = ~(np.abs(lat) <= 90)  # also catches NaN
    if bad.any():
        k = int(np.flatnonzero(bad.ravel())[0])
        value = float(lat.ravel()[k])
        why = "is not a finite number" if not np.isfinite(value) else "is outside [-90, 90]"
        raise GeoTokenError(f"lat[{_where(k, lat.shape)}] = {value!r} {why}")
    bad = ~np.isfinite(lon)
    if bad.any():
        k = int(np.flatnonzero(bad.ravel())[0])
        raise GeoTokenError(f"lon[{_where(k, lon.shape)}] = {float(lon.ravel()[k])!r} is not a finite number")
    outside = np.abs(lon) > 180
    if outside.any():
        lon = np.where(outside, np.remainder(lon + 180, 360) - 180, lon)
    return lat, lon


def _int_array(values, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.dtype.kind not in "iu":
        if array.dtype.kind == "f" and array.size and np.array_equal(array, np.round(array)):
            return array.astype(np.int64)
        raise GeoTokenError(f"{name} must be integers, got dtype {array.dtype}")
    return array


def _uint64(ids, name: str) -> np.ndarray:
    """ids as uint64: int64 arrays are reinterpreted (ids of faces 4 and 5 look negative there)."""
    if not isinstance(ids, np.ndarray):
        # Through object: NumPy would turn a list like [2**63, 1] into float64 and lose bits.
        ids = np.asarray(ids, dtype=object)
        if not all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in ids.ravel().tolist()):
            raise GeoTokenError(f"{name} must be integer S2 cell ids")
        try:
            return ids.astype(np.uint64)
        except OverflowError:
            raise GeoTokenError(
                f"{name} must be unsigned 64-bit S2 cell ids (one is negative or too large)"
            ) from None
    if ids.dtype == np.int64:
        return ids.view(np.uint64)
    if ids.dtype.kind not in "iu":
        raise GeoTokenError(f"{name} must be unsigned 64-bit S2 cell ids, got dtype {ids.dtype}")
    return ids.astype(np.uint64)


def _cell_id_array(ids, name: str = "ids") -> np.ndarray:
    """uint64 cell ids, every one a valid S2 cell."""
    ids = _uint64(ids, name)
    low = ids & (~ids + np.uint64(1))  # lowest set bit
    trailing = np.bitwise_count(low - np.uint64(1)).astype(np.int64)
    bad = (ids == 0) | ((ids >> np.uint64(_POS_BITS)) >= NUM_FACES) | (trailing % 2 == 1)
    if bad.any():
        k = int(np.flatnonzero(bad.ravel())[0])
        raise GeoTokenError(
            f"{name}[{_where(k, ids.shape)}] = {int(ids.ravel()[k]):#018x} is not a valid S2 cell id"
        )
    return ids


# --- lat/lon -> cells ---------------------------------------------------------------------------------------
def _face_uv(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cube face and (u, v) in [-1, 1] of unit vectors, in s2geometry's order of operations (XYZtoFaceUV).

    Choices are made by multiplying with 0/1 masks rather than with np.where: exact (a * 1 = a, a * 0 = +-0,
    and adding +-0 changes nothing) and several times faster when the mask is random.
    """
    ax, ay, az = np.abs(x), np.abs(y), np.abs(z)
    x_gt_y = ax > ay
    axis0 = x_gt_y & (ax > az)  # LargestAbsComponent: ties go to the later axis
    axis1 = ~x_gt_y & (ay > az)
    axis2 = ~(axis0 | axis1)
    m0, m1, m2 = axis0.astype(np.float64), axis1.astype(np.float64), axis2.astype(np.float64)
    denom = x * m0 + y * m1 + z * m2
    negative = denom < 0
    # Numerators of (u, v) on the positive face of each axis: (y, z), (-x, z), (-x, -y); the negative
    # face of the same axis (3, 4, 5) swaps them.
    first = y * m0 - x * (1 - m0)
    second = z * (1 - m2) - y * m2
    neg = negative.astype(np.float64)
    u = (second * neg + first * (1 - neg)) / denom
    v = (first * neg + second * (1 - neg)) / denom
    face = axis1 + 2 * axis2 + 3 * negative
    return face, u, v


def _uv_to_scaled_st(u: np.ndarray, level: int) -> np.ndarray:
    """s * 2**level, bit for bit, where s is S2's quadratic UVtoST(u) = 0.5 sqrt(1 + 3u) or 1 - 0.5 sqrt(1 - 3u).

    With c = 2**(level-1) and h = sqrt(1 + 3|u|) * c in [c, 2c], this is c + copysign(h - c, u): 1 - 3u equals
    1 + 3|u| exactly for u < 0, scaling by a power of two is exact, h - c is exact (Sterbenz), and so are
    c + (h - c) = h and c - (h - c) = 2c - h, which are representable.
    """
    c = 0.5 * 2.0**level
    h = np.sqrt(1 + 3 * np.abs(u)) * c - c
    return c + np.copysign(h, u, out=h)


def _st_to_uv(s: np.ndarray) -> np.ndarray:
    return np.where(s >= 0.5, (1 / 3.0) * (4 * s * s - 1), (1 / 3.0) * (1 - 4 * (1 - s) * (1 - s)))


# Fast sin/cos: a table of 4096 angles and the angle-addition formulas with a short Taylor series for the
# remainder |d| <= pi/4096. Within 1e-15 of the exact values (libm's differ by < 1.2e-16), three times faster
# than NumPy's libm loop here; which is all `_ST_TOLERANCE` needs.
_SINCOS_STEPS = 4096
_SINCOS_STEP = 2 * math.pi / _SINCOS_STEPS
_SIN_TABLE = np.sin(np.arange(_SINCOS_STEPS) * _SINCOS_STEP)
_COS_TABLE = np.cos(np.arange(_SINCOS_STEPS) * _SINCOS_STEP)


def _sincos(angle: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sin and cos of angles in radians (|angle| <= 2 pi), to ~1e-15 absolute."""
    k = np.rint(angle * (1 / _SINCOS_STEP))
    d = angle - k * _SINCOS_STEP
    row = k.astype(np.intp) & (_SINCOS_STEPS - 1)  # negative k wraps around the table
    sin_k, cos_k = _SIN_TABLE[row], _COS_TABLE[row]
    d2 = d * d
    sin_d = d - d * d2 * (1 / 6)  # next term d^5/120 < 3e-18
    cos_d = 1 - d2 * (0.5 - d2 * (1 / 24))  # next term d^6/720 < 3e-22
    return sin_k * cos_d + cos_k * sin_d, cos_k * cos_d - sin_k * sin_d


def _libm_sincos(angle: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sin and cos from the C library (`math`), one angle at a time: exactly what s2geometry computes."""
    values = angle.tolist()
    return np.array([math.sin(v) for v in values]), np.array([math.cos(v) for v in values])


def _unit_vectors(phi: np.ndarray, theta: np.ndarray, sincos):
    """S2LatLng::ToPoint of angles in radians."""
    sin_phi, cos_phi = sincos(phi)
    sin_theta, cos_theta = sincos(theta)
    return cos_theta * cos_phi, sin_theta * cos_phi, sin_phi


def _face_ij(lat: np.ndarray, lon: np.ndarray, level: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Face and level-`level` (i, j) (int32) of 1-D lat/lon arrays (degrees), identical to s2geometry."""
    phi, theta = _DEG_TO_RAD * lat, _DEG_TO_RAD * lon
    face, u, v = _face_uv(*_unit_vectors(phi, theta, _sincos))
    s, t = _uv_to_scaled_st(u, level), _uv_to_scaled_st(v, level)
    tolerance = _ST_TOLERANCE * 2.0**level
    near = (np.abs(s - np.rint(s)) < tolerance) | (np.abs(t - np.rint(t)) < tolerance)
    if near.any():  # recompute sin/cos of the few points near a cell boundary with libm
        rows = np.flatnonzero(near)
        face[rows], u_rows, v_rows = _face_uv(*_unit_vectors(phi[rows], theta[rows], _libm_sincos))
        s[rows], t[rows] = _uv_to_scaled_st(u_rows, level), _uv_to_scaled_st(v_rows, level)
    top = (1 << level) - 1
    # s >= 0, so the cast is floor (STtoIJ); clamping at 2**level - 1 handles s == 1.
    i = np.minimum(s.astype(np.int32), top)
    j = np.minimum(t.astype(np.int32), top)
    return face, i, j


def _face_pos(lat: np.ndarray, lon: np.ndarray, level: int) -> tuple[np.ndarray, np.ndarray]:
    face, i, j = _face_ij(lat, lon, level)
    return face, _hilbert_pos(face, i, j, level)


def _cell_ids(face: np.ndarray, pos: np.ndarray, level: int) -> np.ndarray:
    shift = np.uint64(_POS_BITS - 2 * level)
    lsb = np.uint64(1 << (2 * (MAX_LEVEL - level)))
    return (face.astype(np.uint64) << np.uint64(_POS_BITS)) | (pos.astype(np.uint64) << shift) | lsb


def _face_pos_of_ids(ids: np.ndarray, level: int) -> tuple[np.ndarray, np.ndarray]:
    """Face and the first 2*level position bits of (valid) uint64 ids, as int64."""
    face = (ids >> np.uint64(_POS_BITS)).astype(np.int64)
    pos = (ids >> np.uint64(_POS_BITS - 2 * level)) & np.uint64((1 << (2 * level)) - 1)
    return face, pos.astype(np.int64)


def latlon_to_cell_ids(lat, lon, level: int = MAX_LEVEL) -> np.ndarray:
    """S2 cell ids (uint64, shape of lat) of the level-`level` cells containing the points (degrees)."""
    level = _check_level(level)
    lat, lon = _latlon_arrays(lat, lon)
    flat_lat, flat_lon = lat.ravel(), lon.ravel()
    out = np.empty(flat_lat.shape, dtype=np.uint64)
    for start in range(0, flat_lat.size, _CHUNK):
        block = slice(start, start + _CHUNK)
        face, pos = _face_pos(flat_lat[block], flat_lon[block], level)
        out[block] = _cell_ids(face, pos, level)
    return out.reshape(lat.shape)


# --- tokens -----------------------------------------------------------------------------------------------
def _group_spans(level: int, group: int) -> list[tuple[int, int]]:
    """[start, end) child levels (0-based) of each grouped token; the last group may be shorter."""
    return [(start, min(start + group, level)) for start in range(0, level, group)]


def vocab_sizes(level: int = 20, group: int = 2) -> list[int]:
    """Vocabulary of each token position: [6, 4**group, ..., 4**(last group's length)]."""
    level, group = _check_level(level), _check_group(group)
    return [NUM_FACES] + [4 ** (end - start) for start, end in _group_spans(level, group)]


@functools.lru_cache(maxsize=16)
def _token_fields(level: int, group: int, rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shift, mask and vocabulary size (uint64) of every token of `rows` rows, flattened to (rows * T,)."""
    spans = _group_spans(level, group)
    shifts = [2 * level] + [2 * (level - end) for _, end in spans]
    masks = [7] + [(1 << 2 * (end - start)) - 1 for start, end in spans]
    sizes = vocab_sizes(level, group)
    tile = functools.partial(np.tile, reps=rows)
    return tile(np.array(shifts, np.int64)), tile(np.array(masks, np.int64)), tile(np.array(sizes, np.uint64))


def _tokens_from_face_pos(face: np.ndarray, pos: np.ndarray, level: int, group: int, out=None) -> np.ndarray:
    """Tokens (N, T) of cells given by face and position; written into `out` when given."""
    rows = face.size
    if out is None:
        out = np.empty((rows, len(_group_spans(level, group)) + 1), dtype=np.int64)
    # Copy each cell's (face, position) key into every column, then cut each column's bit field out of it
    # with flat element-wise shifts: much faster than broadcasting over the short token axis.
    np.copyto(out, ((face << (2 * level)) | pos)[:, None])
    flat = out.reshape(-1)  # (N * T,)
    shifts, masks, _ = _token_fields(level, group, rows)
    np.right_shift(flat, shifts, out=flat)
    np.bitwise_and(flat, masks, out=flat)
    return out


def _token_rows(tokens, level: int, group: int, name: str) -> tuple[np.ndarray, tuple[int, ...]]:
    """Tokens (..., T) as rows (N, T), and the leading shape (...); the last axis must fit level and group."""
    tokens = _int_array(tokens, name)
    width = len(vocab_sizes(level, group))
    if tokens.ndim == 0 or tokens.shape[-1] != width:
        raise GeoTokenError(
            f"{name} has shape {tokens.shape}; level {level} with group {group} needs {width} tokens per row "
            f"(last axis)"
        )
    return tokens.reshape(-1, width), tokens.shape[:-1]


def _decode_blocks(rows: np.ndarray, lead: tuple[int, ...], level: int, group: int, name: str):
    """Yield (row slice, face, position) of token rows, block by block, after checking every vocabulary."""
    spans = _group_spans(level, group)
    place = np.array([1 << 2 * (level - end) for _, end in spans], dtype=np.int64)  # (T-1,) digit values
    for start in range(0, len(rows), _CHUNK):
        block = np.ascontiguousarray(rows[start : start + _CHUNK], dtype=np.int64)  # (B, T)
        # One flat comparison per block; as uint64, negative tokens are huge and fail it too.
        bad = block.reshape(-1).view(np.uint64) >= _token_fields(level, group, len(block))[2]
        if bad.any():
            row, col = divmod(int(np.flatnonzero(bad)[0]), block.shape[1])
            where = f"{col}" if not lead else f"{_where(start + row, lead)}, {col}"
            size = NUM_FACES if col == 0 else 4 ** (spans[col - 1][1] - spans[col - 1][0])
            raise GeoTokenError(
                f"{name}[{where}] = {int(block[row, col])} is outside its vocabulary 0..{size - 1}"
            )
        # The position is the sum of each group's value times its place (the bit fields do not overlap).
        yield slice(start, start + len(block)), block[:, 0], block[:, 1:] @ place


def latlon_to_tokens(lat, lon, level: int = 20, group: int = 2) -> np.ndarray:
    """Grouped location tokens, int64 of shape lat.shape + (1 + ceil(level / group),), coarse to fine.

    A latitude outside [-90, 90] or a non-finite value is an error; longitudes outside [-180, 180] wrap (540 is
    -180). Points on a cell edge take S2's side of it, as s2geometry does: lon 180 and lon -180 are one place
    but two token sequences (cells about 6 m apart at level 20)."""
    level, group = _check_level(level), _check_group(group)
    lat, lon = _latlon_arrays(lat, lon)
    flat_lat, flat_lon = lat.ravel(), lon.ravel()
    out = np.empty((flat_lat.size, len(vocab_sizes(level, group))), dtype=np.int64)
    for start in range(0, flat_lat.size, _CHUNK):
        block = slice(start, start + _CHUNK)
        face, pos = _face_pos(flat_lat[block], flat_lon[block], level)
        _tokens_from_face_pos(face, pos, level, group, out=out[block])
    return out.reshape(lat.shape + out.shape[-1:])


def tokens_to_latlon(tokens, level: int = 20, group: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Centre (lat, lon in degrees) of the cell that grouped tokens (..., T) name."""
    level, group = _check_level(level), _check_group(group)
    rows, lead = _token_rows(tokens, level, group, "tokens")
    lat, lon = np.empty(len(rows)), np.empty(len(rows))
    for block, face, pos in _decode_blocks(rows, lead, level, group, "tokens"):
        lat[block], lon[block] = _center_latlon(face, pos, level)
    return lat.reshape(lead), lon.reshape(lead)


def cell_ids_to_tokens(ids, level: int) -> np.ndarray:
    """Ungrouped tokens (..., 1 + level): face, then one child index per level. Finer ids give their ancestor's."""
    level = _check_level(level)
    ids = _cell_id_array(ids)
    _check_at_least(ids, level)
    flat = ids.ravel()
    out = np.empty((flat.size, 1 + level), dtype=np.int64)
    for start in range(0, flat.size, _CHUNK):
        block = slice(start, start + _CHUNK)
        face, pos = _face_pos_of_ids(flat[block], level)
        _tokens_from_face_pos(face, pos, level, 1, out=out[block])
    return out.reshape(ids.shape + (1 + level,))


def tokens_to_cell_ids(tokens, level: int) -> np.ndarray:
    """Inverse of `cell_ids_to_tokens`: uint64 ids of the level-`level` cells."""
    level = _check_level(level)
    rows, lead = _token_rows(tokens, level, 1, "tokens")
    out = np.empty(len(rows), dtype=np.uint64)
    for block, face, pos in _decode_blocks(rows, lead, level, 1, "tokens"):
        out[block] = _cell_ids(face, pos, level)
    return out.reshape(lead)


def _regroup(rows, lead, level: int, group: int, new_group: int, name: str) -> np.ndarray:
    out = np.empty((len(rows), len(vocab_sizes(level, new_group))), dtype=np.int64)
    for block, face, pos in _decode_blocks(rows, lead, level, group, name):
        _tokens_from_face_pos(face, pos, level, new_group, out=out[block])
    return out.reshape(lead + out.shape[-1:])


def group_tokens(tokens, group: int) -> np.ndarray:
    """(..., 1 + level) child tokens -> (..., 1 + ceil(level / group)) base-4 groups, first child most significant."""
    group = _check_group(group)
    shape = np.shape(tokens)
    if not shape or not 1 <= shape[-1] <= MAX_LEVEL + 1:
        raise GeoTokenError(f"tokens has shape {shape}; the last axis must hold 1 + level tokens")
    level = shape[-1] - 1
    return _regroup(*_token_rows(tokens, level, 1, "tokens"), level, 1, group, "tokens")


def ungroup_tokens(grouped, level: int, group: int) -> np.ndarray:
    """Inverse of `group_tokens`: (..., 1 + ceil(level / group)) -> (..., 1 + level)."""
    level, group = _check_level(level), _check_group(group)
    return _regroup(*_token_rows(grouped, level, group, "grouped"), level, group, 1, "grouped")


# --- cells ------------------------------------------------------------------------------------------------
def _levels(ids: np.ndarray) -> np.ndarray:
    low = ids & (~ids + np.uint64(1))
    return MAX_LEVEL - np.bitwise_count(low - np.uint64(1)).astype(np.int64) // 2


def _check_at_least(ids: np.ndarray, level: int) -> None:
    coarse = _levels(ids) < level
    if coarse.any():
        k = int(np.flatnonzero(coarse.ravel())[0])
        raise GeoTokenError(
            f"ids[{_where(k, ids.shape)}] = {int(ids.ravel()[k]):#018x} is a level-{int(_levels(ids).ravel()[k])} "
            f"cell, coarser than level {level}"
        )


def cell_level(ids) -> np.ndarray:
    """Level (0..30, int64) of each cell id."""
    return _levels(_cell_id_array(ids))


def cell_parent(ids, level: int) -> np.ndarray:
    """Ancestor at `level` (uint64) of each cell id; an id already at `level` is returned unchanged."""
    level = _check_level(level)
    ids = _cell_id_array(ids)
    _check_at_least(ids, level)
    lsb = np.uint64(1 << (2 * (MAX_LEVEL - level)))
    return (ids & ~(lsb - np.uint64(1))) | lsb


def _latlon_of_xyz(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # S2LatLng(p): "+ 0.0" turns -0.0 into +0.0, so the face centre on a pole gets longitude 0, not -180.
    lat = _RAD_TO_DEG * np.arctan2(z + 0.0, np.sqrt(x * x + y * y))
    lon = _RAD_TO_DEG * np.arctan2(y + 0.0, x + 0.0)
    return lat, lon


# S2's FaceUVtoXYZ as coefficients: _FACE_FRAME[face, axis] = weights of (1, u, v) in that axis of the point.
# Face 0 is (1, u, v), 1 is (-u, 1, v), 2 is (-u, -v, 1), 3 is (-1, -v, -u), 4 is (v, -1, -u), 5 is (v, u, -1).
_FACE_FRAME = np.array(
    [
        [[1, 0, 0], [0, 1, 0], [0, 0, 1]],
        [[0, -1, 0], [1, 0, 0], [0, 0, 1]],
        [[0, -1, 0], [0, 0, -1], [1, 0, 0]],
        [[-1, 0, 0], [0, 0, -1], [0, -1, 0]],
        [[0, 0, 1], [-1, 0, 0], [0, -1, 0]],
        [[0, 0, 1], [0, 1, 0], [-1, 0, 0]],
    ],
    dtype=np.float64,
)  # (6 faces, 3 axes, 3 weights)


def _face_uv_to_xyz(face: np.ndarray, u: np.ndarray, v: np.ndarray):
    """Point on the cube (not unit length) for face coordinates. Exact: one weight is +-1, the others 0."""
    return tuple(w[face, 0] + w[face, 1] * u + w[face, 2] * v for w in _FACE_FRAME.transpose(1, 0, 2))


def _center_latlon(face: np.ndarray, pos: np.ndarray, level: int) -> tuple[np.ndarray, np.ndarray]:
    i, j = _hilbert_ij(face, pos, level)
    # Cell centre in (si, ti) units of 2**-31, exactly as S2CellId::GetCenterSiTi.
    scale = 1.0 / (1 << (level + 1))
    u = _st_to_uv((2 * i + 1) * scale)
    v = _st_to_uv((2 * j + 1) * scale)
    return _latlon_of_xyz(*_face_uv_to_xyz(face, u, v))


def _cells_by_level(ids: np.ndarray):
    """Yield (rows, face, position, level) of valid flat ids, block by block and one level at a time."""
    for start in range(0, ids.size, _CHUNK):
        block = ids[start : start + _CHUNK]
        levels = _levels(block)
        for level in np.unique(levels).tolist():
            if levels[0] == levels[-1] == level and (levels == level).all():
                rows, cells = slice(start, start + block.size), block  # the usual case: one level
            else:
                rows = np.flatnonzero(levels == level)
                rows, cells = start + rows, block[rows]
            yield (rows, *_face_pos_of_ids(cells, level), level)


def cell_center(ids) -> tuple[np.ndarray, np.ndarray]:
    """Centre (lat, lon in degrees) of each cell, as S2CellId::ToLatLng."""
    ids = _cell_id_array(ids)
    lat, lon = np.empty(ids.size), np.empty(ids.size)
    for rows, face, pos, level in _cells_by_level(ids.ravel()):
        lat[rows], lon[rows] = _center_latlon(face, pos, level)
    return lat.reshape(ids.shape), lon.reshape(ids.shape)


def cell_vertices(ids) -> np.ndarray:
    """Four corners of each cell, (..., 4, 2) lat/lon degrees, counter-clockwise as S2Cell::GetVertex."""
    ids = _cell_id_array(ids)
    out = np.empty((ids.size, 4, 2))
    for rows, face, pos, level in _cells_by_level(ids.ravel()):
        i, j = _hilbert_ij(face, pos, level)
        size = 1.0 / (1 << level)
        u_lo, u_hi = _st_to_uv(i * size), _st_to_uv((i + 1) * size)
        v_lo, v_hi = _st_to_uv(j * size), _st_to_uv((j + 1) * size)
        for k, (u, v) in enumerate([(u_lo, v_lo), (u_hi, v_lo), (u_hi, v_hi), (u_lo, v_hi)]):
            out[rows, k, 0], out[rows, k, 1] = _latlon_of_xyz(*_face_uv_to_xyz(face, u, v))
    return out.reshape(ids.shape + (4, 2))


# --- hex tokens -------------------------------------------------------------------------------------------
_HEX_DIGITS = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
_HEX_VALUES = np.full(256, 255, dtype=np.uint8)
_HEX_VALUES[np.frombuffer(b"0123456789abcdef", dtype=np.uint8)] = np.arange(16)
_HEX_VALUES[np.frombuffer(b"ABCDEF", dtype=np.uint8)] = np.arange(10, 16)
_NIBBLE_SHIFTS = np.arange(60, -4, -4, dtype=np.uint64)  # (16,) most significant first


def cell_ids_to_hex(ids) -> np.ndarray:
    """S2 token strings (S2CellId::ToToken): 16 hex digits without trailing zeros; 0 becomes "X"."""
    ids = _uint64(ids, "ids")
    flat = ids.ravel()
    nibbles = ((flat[:, None] >> _NIBBLE_SHIFTS) & np.uint64(15)).astype(np.intp)  # (N, 16)
    text = np.ascontiguousarray(_HEX_DIGITS[nibbles]).view("S16").ravel()
    text = np.strings.rstrip(text, b"0")
    text = np.where(flat == 0, b"X", text)
    return text.astype(str).reshape(ids.shape)


def hex_to_cell_ids(tokens) -> np.ndarray:
    """Inverse of `cell_ids_to_hex` (upper- or lower-case hex); malformed tokens raise GeoTokenError."""
    text = np.asarray(tokens)
    if text.dtype.kind not in "US":
        raise GeoTokenError(f"tokens must be strings, got dtype {text.dtype}")
    flat = text.ravel().astype(str)
    lengths = np.strings.str_len(flat)
    is_x = (flat == "X") | (flat == "x")
    codes = (
        np.strings.ljust(flat, 16, "0").astype("U16").view(np.uint32).reshape(-1, 16)
    )  # (N, 16) code points
    digits = _HEX_VALUES[np.minimum(codes, 255)]
    bad = ((digits == 255).any(axis=1) | (lengths == 0) | (lengths > 16)) & ~is_x
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        raise GeoTokenError(
            f"tokens[{_where(k, text.shape)}] = {str(flat[k])!r} is not an S2 cell token (1-16 hex digits)"
        )
    digits = np.where(is_x[:, None], 0, digits).astype(np.uint64)
    ids = np.bitwise_or.reduce(digits << _NIBBLE_SHIFTS, axis=1)
    return ids.reshape(text.shape)
