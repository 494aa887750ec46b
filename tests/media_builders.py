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
SDT_PID = 0x11  # DVB service description table (service names)


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
    """A chunk without the JUNK padding, OpenDML list and video properties (``vprp``) that ffmpeg
    writes and MEncoder does not."""
    if fourcc in (b"JUNK", b"vprp") or (fourcc == b"LIST" and payload[:4] == b"odml"):
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


def ts_without_pids(data: bytes, pids: set[int]) -> bytes:
    return b"".join(p for p in ts_packets(data) if ts_pid(p) not in pids)


def first_pat_offset(data: bytes) -> int:
    """Byte offset of the first packet of PID 0 (the PAT)."""
    return next(i * TS_PACKET for i, p in enumerate(ts_packets(data)) if ts_pid(p) == 0)


# ----------------------------------------------------------------------------- real-writer files


def mencoder_style_avi(out: Path) -> Path:
    """A DivX-3 (msmpeg4v3) AVI whose first 4 KB are mostly a JUNK chunk of readable padding."""
    plain = lavfi(out.with_name(out.stem + ".plain.avi"), "testsrc2=size=96x64:rate=10:duration=3",
                  "-c:v", "msmpeg4", "-q:v", "6")
    junk = readable_text(6000, "[ room kept free by the encoder for later header edits ] ")
    out.write_bytes(avi_with_text_junk(plain.read_bytes(), junk))
    plain.unlink()
    return out


def camera_mp4(out: Path) -> Path:
    """An MP4 as a camera writes it: ``ftyp``, a ``free`` box of readable reserved bytes, ``mdat``,
    and the index (``moov``) at the end, with audio."""
    plain = lavfi(out.with_name(out.stem + ".plain.mp4"), "testsrc2=size=80x60:rate=25:duration=2",
                  "-f", "lavfi", "-i", "sine=duration=2", *FAST_X264, "-c:a", "aac", "-shortest")
    reserved = readable_text(5000, "CAMERA FIRMWARE 1.02 RESERVED ")
    out.write_bytes(insert_before_mdat(plain.read_bytes(), free_box(reserved)))
    plain.unlink()
    return out


def mkv_with_attachment(out: Path) -> Path:
    """A Matroska file carrying a text attachment (an .nfo) in its header."""
    nfo = out.with_name(out.stem + ".nfo")
    nfo.write_bytes(readable_text(7000, "Release notes: holiday footage, camera B, day 2. "))
    lavfi(out, "testsrc2=size=64x48:rate=12:duration=2", *FAST_X264, "-attach", str(nfo),
          "-metadata:s:t", "mimetype=text/plain")
    nfo.unlink()
    return out


def plain_ts(out: Path, *, sdt: bool = True) -> Path:
    """MPEG-2 video and MP2 audio in an MPEG-TS as ffmpeg muxes it; ``sdt=False`` drops the
    service description (PID 0x11), as a recorder that keeps one programme's PIDs does."""
    lavfi(out, "testsrc2=size=64x48:rate=25:duration=2", "-f", "lavfi", "-i", "sine=duration=2",
          "-c:v", "mpeg2video", "-c:a", "mp2", "-shortest", "-f", "mpegts")
    if not sdt:
        out.write_bytes(ts_without_pids(out.read_bytes(), {SDT_PID}))
    return out


def broadcast_capture_ts(out: Path) -> Path:
    """A recording cut mid-stream: ~4.5 KB of text packets on a PID the PMT does not list (a
    programme guide or teletext) come before the first PAT/PMT; one programme's PIDs, no SDT."""
    plain = plain_ts(out.with_name(out.stem + ".plain.ts"), sdt=False)
    guide = readable_text(24 * (TS_PACKET - 4), "20:00 News. 20:15 Weather. 20:30 Film. ")
    out.write_bytes(ts_with_late_tables(plain.read_bytes(), guide))
    plain.unlink()
    return out


PHONE_FRAMES = 36  # frames the VFR phone clip keeps out of 90


def vfr_phone_clip(out: Path) -> Path:
    """A portrait phone clip: QuickTime, variable frame rate (36 frames kept of 3 s at 30 fps, at
    irregular intervals), audio, and a 90-degree clockwise turn (270 counter-clockwise) in the
    track matrix with the translation phones write."""
    plain = lavfi(out.with_name(out.stem + ".plain.mov"), "testsrc2=size=96x64:rate=30:duration=3",
                  "-f", "lavfi", "-i", "sine=duration=3", "-vf",
                  "select='lt(mod(n\\,5)\\,2)'", *vfr_args(), *FAST_X264, "-c:a", "aac",
                  "-shortest", "-f", "mov")
    out.write_bytes(set_rotation(plain.read_bytes(), 270, translate=True))
    plain.unlink()
    return out


REAL_WRITERS = {  # file name -> builder
    "mencoder.avi": mencoder_style_avi,
    "camera.mp4": camera_mp4,
    "attachment.mkv": mkv_with_attachment,
    "broadcast.ts": broadcast_capture_ts,
    "phone.mov": vfr_phone_clip,
}
