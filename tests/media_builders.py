"""Crafted media files that mimic real writers: ffmpeg encodes, byte surgery shapes the container.

Everything runs with the ffmpeg vimpac itself uses (``ffmpeg_exe()``: ``VIMPAC_FFMPEG``, else
``PATH``, else the bundled one) and only needs options that ffmpeg 4.2 already has: rotation is
written straight into the MP4 track header's matrix instead of ffmpeg 6's ``-display_rotation``.

Writers mimicked (layouts from the public container specifications):
* AVI as MEncoder / VirtualDub write it: a short ``hdrl`` then a large ``JUNK`` padding chunk of
  readable text before ``LIST movi``.
* MP4 / MOV as cameras and phones write them: ``moov`` at the end, a ``free`` box of reserved,
  readable bytes before ``mdat``, a rotation matrix in ``tkhd`` (ISO/IEC 14496-12 8.3.2), variable
  frame durations.
* Matroska with a text attachment (an ``.nfo``) stored in the header.
* MPEG-TS cut from a broadcast: packets of a PID the PMT does not list (programme-guide text) come
  before the first PAT/PMT.
"""

from __future__ import annotations

import math
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

from vimpac.common.ffmpeg_exe import ffmpeg_exe, fps_mode_args

FAST_X264 = ("-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p")
TS_PACKET = 188


def run_ffmpeg(*args: str, stdin: bytes | None = None) -> None:
    """Run the ffmpeg vimpac uses (errors only), overwriting outputs."""
    nostdin = ["-nostdin"] if stdin is None else []
    subprocess.run([ffmpeg_exe(), "-v", "error", "-y", *nostdin, *args], input=stdin, check=True,
                   timeout=120)


def lavfi(out: Path, source: str, *args: str) -> Path:
    """Encode a lavfi source (``testsrc2=...``, ``sine=...``) into ``out``."""
    run_ffmpeg("-f", "lavfi", "-i", source, *args, str(out))
    return out


def vfr_args() -> list[str]:
    """Output options that keep variable frame timing (``-fps_mode vfr``, ``-vsync vfr`` on 4.x)."""
    return fps_mode_args("vfr")


def printable_share(head: bytes) -> float:
    """Share of printable ASCII (and tab, CR, LF) in ``head``."""
    return sum(32 <= b < 127 or b in (9, 10, 13) for b in head) / max(len(head), 1)


def readable_text(n: int, line: str) -> bytes:
    """``n`` bytes of ASCII made of ``line`` repeated."""
    return (line * (n // len(line) + 1)).encode("ascii")[:n]


# ----------------------------------------------------------------------------- ISO-BMFF (MP4/MOV)

_CONTAINERS = {b"moov", b"trak", b"mdia", b"minf", b"stbl", b"edts", b"dinf", b"udta"}


def boxes(data: bytes, start: int = 0, end: int | None = None) -> Iterator[tuple[bytes, int, int]]:
    """(type, offset, size) of the boxes in ``data[start:end]`` (one level)."""
    end = len(data) if end is None else end
    pos = start
    while pos + 8 <= end:
        size, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if size == 1:
            size = struct.unpack(">Q", data[pos + 8:pos + 16])[0]
        elif size == 0:
            size = end - pos
        if size < 8:
            raise ValueError(f"bad box size {size} at {pos}")
        yield kind, pos, size
        pos += size


def find_boxes(data: bytes, path: tuple[bytes, ...], start: int = 0,
               end: int | None = None) -> list[tuple[int, int]]:
    """(offset, size) of every box at ``path`` (e.g. ``(b"moov", b"trak")``)."""
    found = []
    for kind, pos, size in boxes(data, start, end):
        if kind != path[0]:
            continue
        if len(path) == 1:
            found.append((pos, size))
        elif kind in _CONTAINERS:
            found += find_boxes(data, path[1:], pos + 8, pos + size)
    return found


def _handler(data: bytes, trak: tuple[int, int]) -> bytes:
    """Handler type of a track ("vide", "soun", ...)."""
    (hdlr, _), = find_boxes(data, (b"mdia", b"hdlr"), trak[0] + 8, sum(trak))
    return data[hdlr + 16:hdlr + 20]        # size, type, version+flags, pre_defined, handler


def rotation_matrix(degrees: int, width: int = 0, height: int = 0) -> list[int]:
    """The tkhd matrix {a b u, c d v, x y w} that turns the picture ``degrees`` counter-clockwise.

    a, b, c, d, x, y are 16.16 fixed point, u, v, w 2.30; a point maps to (a*px + c*py + x,
    b*px + d*py + y). With the stored ``width`` and ``height``, x and y move the turned picture
    back to the origin, as phones write it (ffmpeg reads only the turn).
    """
    rad = math.radians(degrees)
    a, b, c, d = round(math.cos(rad)), -round(math.sin(rad)), round(math.sin(rad)), \
        round(math.cos(rad))
    corners = [(0, 0), (width, 0), (0, height), (width, height)]
    x = -min(a * px + c * py for px, py in corners)
    y = -min(b * px + d * py for px, py in corners)
    return [a << 16, b << 16, 0, c << 16, d << 16, 0, x << 16, y << 16, 1 << 30]


def set_rotation(data: bytes, degrees: int, *, translate: bool = False) -> bytes:
    """``data`` (an MP4/MOV) with its video track turned ``degrees`` counter-clockwise on display.

    Writes the track header's matrix (the same place ffmpeg's ``-display_rotation`` writes, and
    what phones write), so any ffmpeg >= 4.2 reads it.
    """
    out = bytearray(data)
    for trak in find_boxes(data, (b"moov", b"trak")):
        if _handler(data, trak) != b"vide":
            continue
        (tkhd, _), = find_boxes(data, (b"tkhd",), trak[0] + 8, sum(trak))
        version = data[tkhd + 8]
        matrix_at = tkhd + 12 + (32 if version == 1 else 20) + 8 + 8   # times, ids, layer...
        width, height = (v >> 16 for v in struct.unpack(">II", data[matrix_at + 36:
                                                                    matrix_at + 44]))
        matrix = rotation_matrix(degrees, width, height) if translate \
            else rotation_matrix(degrees)
        out[matrix_at:matrix_at + 36] = struct.pack(">9i", *matrix)
    return bytes(out)


def with_rotation(src: Path, out: Path, degrees: int, *, translate: bool = False) -> Path:
    """Copy of ``src`` whose video is shown turned ``degrees`` counter-clockwise."""
    out.write_bytes(set_rotation(src.read_bytes(), degrees, translate=translate))
    return out


def insert_before_mdat(data: bytes, box: bytes) -> bytes:
    """``data`` with ``box`` inserted before the top-level ``mdat``; chunk offsets follow."""
    (mdat, _), = find_boxes(data, (b"mdat",))
    shift = len(box)
    out = bytearray(data[:mdat] + box + data[mdat:])
    for moov, size in find_boxes(bytes(out), (b"moov",)):
        for trak in find_boxes(bytes(out), (b"trak",), moov + 8, moov + size):
            for kind, width in ((b"stco", 4), (b"co64", 8)):
                path = (b"mdia", b"minf", b"stbl", kind)
                for table, _ in find_boxes(bytes(out), path, trak[0] + 8, sum(trak)):
                    _shift_offsets(out, table, width, shift, mdat)
    return bytes(out)


def _shift_offsets(out: bytearray, table: int, width: int, shift: int, after: int) -> None:
    """Add ``shift`` to every chunk offset >= ``after`` in the stco/co64 box at ``table``."""
    fmt = ">I" if width == 4 else ">Q"
    (count,) = struct.unpack(">I", out[table + 12:table + 16])
    for i in range(count):
        at = table + 16 + i * width
        (offset,) = struct.unpack(fmt, out[at:at + width])
        if offset >= after:
            out[at:at + width] = struct.pack(fmt, offset + shift)


def free_box(payload: bytes) -> bytes:
    return struct.pack(">I4s", 8 + len(payload), b"free") + payload


# ----------------------------------------------------------------------------- RIFF (AVI)


def riff_items(data: bytes, start: int, end: int) -> list[tuple[bytes, bytes]]:
    """(fourcc, payload) of the chunks in ``data[start:end]`` (one level)."""
    items, pos = [], start
    while pos + 8 <= end:
        fourcc, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        items.append((fourcc, data[pos + 8:pos + 8 + size]))
        pos += 8 + size + (size & 1)
    return items


def riff_chunk(fourcc: bytes, payload: bytes) -> bytes:
    return fourcc + len(payload).to_bytes(4, "little") + payload + b"\0" * (len(payload) & 1)


def _lean_list(fourcc: bytes, payload: bytes) -> bytes | None:
    """A chunk without JUNK padding inside (and no OpenDML list, which MEncoder does not write)."""
    if fourcc == b"JUNK" or (fourcc == b"LIST" and payload[:4] == b"odml"):
        return None
    if fourcc != b"LIST" or payload[:4] == b"movi":
        return riff_chunk(fourcc, payload)
    children = [_lean_list(f, p) for f, p in riff_items(payload, 4, len(payload))]
    return riff_chunk(b"LIST", payload[:4] + b"".join(c for c in children if c))


def avi_with_text_junk(data: bytes, junk: bytes) -> bytes:
    """An ffmpeg AVI reshaped as MEncoder writes one: lean ``hdrl``, then ``junk`` in a JUNK chunk
    right before ``LIST movi`` (idx1 offsets are relative to ``movi``, so they still hold)."""
    if data[:4] != b"RIFF" or data[8:12] != b"AVI ":
        raise ValueError("not an AVI file")
    size = int.from_bytes(data[4:8], "little")
    body = [b"AVI "]
    for fourcc, payload in riff_items(data, 12, 8 + size):
        if fourcc == b"LIST" and payload[:4] == b"movi":
            body.append(riff_chunk(b"JUNK", junk))
        body.append(_lean_list(fourcc, payload) or b"")
    return riff_chunk(b"RIFF", b"".join(body))


# ----------------------------------------------------------------------------- MPEG-TS


def ts_packets(data: bytes) -> list[bytes]:
    if len(data) % TS_PACKET or data[::TS_PACKET].count(0x47) != len(data) // TS_PACKET:
        raise ValueError("not a 188-byte-packet MPEG-TS")
    return [data[i:i + TS_PACKET] for i in range(0, len(data), TS_PACKET)]


def ts_pid(packet: bytes) -> int:
    return ((packet[1] & 0x1F) << 8) | packet[2]


def ts_text_packets(text: bytes, pid: int) -> bytes:
    """Packets of ``pid`` carrying ``text`` (184 bytes each), continuity counter counting."""
    out = []
    for cc, i in enumerate(range(0, len(text), TS_PACKET - 4)):
        payload = text[i:i + TS_PACKET - 4].ljust(TS_PACKET - 4, b" ")
        out.append(bytes([0x47, (pid >> 8) & 0x1F, pid & 0xFF, 0x10 | (cc & 0x0F)]) + payload)
    return b"".join(out)


def ts_with_late_tables(data: bytes, text: bytes, pid: int = 0x1FF0) -> bytes:
    """``data`` (an MPEG-TS) preceded by packets of an unlisted ``pid`` carrying ``text``, so its
    first PAT/PMT only come after ``len(text)`` bytes or so, as in a cut broadcast capture."""
    ts_packets(data)
    if pid in {ts_pid(p) for p in ts_packets(data)}:
        raise ValueError(f"PID {pid:#x} is already used")
    return ts_text_packets(text, pid) + data


def first_pat_offset(data: bytes) -> int:
    """Byte offset of the first packet of PID 0 (the PAT)."""
    return next(i * TS_PACKET for i, p in enumerate(ts_packets(data)) if ts_pid(p) == 0)
