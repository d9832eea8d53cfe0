"""What images and PDFs cost, read from their bytes the way the real API sizes them, with no imaging library.

Images: the API scales an image down (aspect kept) until its long edge is at most ``MAX_LONG_EDGE`` pixels and
its area at most ``MAX_PIXELS``, then charges about ``width * height / 750`` tokens, so no image costs more
than ``MAX_IMAGE_TOKENS``. Dimensions come from the file's header: PNG (IHDR), GIF (logical screen), JPEG (the
first SOF segment) and WebP (VP8, VP8L, VP8X).

PDFs: every page is sent to the model as its extracted text plus an image of the page, so a PDF costs its text
tokens plus, per page, the tokens of the page rendered at ``PDF_RENDER_DPI`` (then scaled like any image: a
Letter or A4 page comes to about ``MAX_IMAGE_TOKENS``). Pages are counted from the page objects (also inside
compressed object streams); text is read from the literal and hex strings shown between BT/ET in the content
streams (Flate-compressed or plain). Glyph codes that are not plain text (CID fonts) are charged as if every
``GLYPHS_PER_TOKEN`` glyphs were one token.

Sources the server cannot see (``url``, ``file``) cost a fixed, documented amount: an image the largest image
can cost, a document ``URL_DOCUMENT_TOKENS``.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import struct
import threading
import zlib
from collections import OrderedDict
from dataclasses import dataclass

MAX_LONG_EDGE = 1568
MAX_PIXELS = 1_150_000
PIXELS_PER_TOKEN = 750
MAX_IMAGE_TOKENS = MAX_PIXELS // PIXELS_PER_TOKEN + 1  # 1,534: the ceiling of the largest scaled area / 750
# the API rejects images larger than this on either side
MAX_IMAGE_SIDE = 8000
IMAGE_MEDIA_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})

PDF_RENDER_DPI = 150
PDF_MAX_PAGES = 100
LETTER_POINTS = (612.0, 792.0)
GLYPHS_PER_TOKEN = 4

# the server cannot fetch a URL or a Files API id: a fixed charge, the dearest image / a short document
URL_IMAGE_TOKENS = MAX_IMAGE_TOKENS
URL_DOCUMENT_TOKENS = 6_000


class MediaError(ValueError):
    """The bytes are not an image / PDF the API would accept; the message is the API's wording."""


# -- images --------------------------------------------------------------------------------------------------
def image_tokens(width: int, height: int) -> int:
    """Tokens of a ``width`` x ``height`` image after the API's downscaling."""
    if width <= 0 or height <= 0:
        return 1
    scale = min(1.0, MAX_LONG_EDGE / max(width, height), math.sqrt(MAX_PIXELS / (width * height)))
    w = max(1, int(width * scale))
    h = max(1, int(height * scale))
    return max(1, math.ceil(w * h / PIXELS_PER_TOKEN))


_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_STANDALONE = frozenset({0x01, 0xD0, 0xD1, 0xD2, 0xD3, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8})


def _jpeg_size(b: bytes) -> tuple[int, int] | None:
    """(width, height) from the first start-of-frame segment; None if not reached in ``b``."""
    i, n = 2, len(b)
    while i + 4 <= n:
        if b[i] != 0xFF:
            return None
        m = b[i + 1]
        if m == 0xFF:  # fill byte
            i += 1
            continue
        if m in _STANDALONE:
            i += 2
            continue
        if m in _SOF:
            if i + 9 > n:
                return None
            h, w = struct.unpack(">HH", b[i + 5:i + 9])
            return w, h
        if m == 0xD9 or m == 0xDA:  # end of image / start of scan before any frame header
            return None
        (length,) = struct.unpack(">H", b[i + 2:i + 4])
        i += 2 + length
    return None


def sniff_image(head: bytes) -> str | None:
    """The media type the bytes really are, or None."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return None


def _size_from(b: bytes, kind: str) -> tuple[int, int] | None:
    if kind == "image/png":
        if len(b) >= 24 and b[12:16] == b"IHDR":
            return struct.unpack(">II", b[16:24])
        return None
    if kind == "image/gif":
        return struct.unpack("<HH", b[6:10]) if len(b) >= 10 else None
    if kind == "image/webp":
        chunk = b[12:16]
        if chunk == b"VP8 " and len(b) >= 30 and b[23:26] == b"\x9d\x01\x2a":
            w, h = struct.unpack("<HH", b[26:30])
            return w & 0x3FFF, h & 0x3FFF
        if chunk == b"VP8L" and len(b) >= 25 and b[20] == 0x2F:
            (bits,) = struct.unpack("<I", b[21:25])
            return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        if chunk == b"VP8X" and len(b) >= 30:
            w = int.from_bytes(b[24:27], "little") + 1
            h = int.from_bytes(b[27:30], "little") + 1
            return w, h
        return None
    if kind == "image/jpeg":
        return _jpeg_size(b)
    return None


def _b64_prefix(data: str, chars: int) -> bytes:
    piece = data[:chars - chars % 4]
    try:
        return base64.b64decode(piece, validate=False)
    except (binascii.Error, ValueError):
        raise MediaError("Could not process image") from None


def image_info(data: str) -> tuple[str, int, int]:
    """(media type, width, height) of base64 image data; ``MediaError`` if it is not a readable image.

    Decodes only as much as the header needs: a few KB, more for a JPEG whose frame header sits behind large
    metadata segments."""
    head = _b64_prefix(data, 4096)
    kind = sniff_image(head)
    if kind is None:
        raise MediaError("Could not process image")
    size = _size_from(head, kind)
    if size is None and kind == "image/jpeg" and len(data) > 4096:
        size = _size_from(_b64_prefix(data, len(data)), kind)
    if size is None or size[0] <= 0 or size[1] <= 0:
        raise MediaError("Could not process image")
    return kind, size[0], size[1]


def base64_image_tokens(data: str) -> int | None:
    """Tokens of base64 image data, None if unreadable (validation rejects those before they are counted)."""
    try:
        _, w, h = image_info(data)
    except MediaError:
        return None
    return image_tokens(w, h)


# -- PDFs ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PdfInfo:
    pages: int
    text: str
    opaque_glyphs: int
    page_points: tuple[float, float]

    @property
    def page_image_tokens(self) -> int:
        w, h = self.page_points
        f = PDF_RENDER_DPI / 72.0
        return image_tokens(int(w * f), int(h * f))


_STREAM = re.compile(rb"stream\r?\n")
_PAGE = re.compile(rb"/Type\s*/Page(?![A-Za-z])")
_COUNT = re.compile(rb"/Type\s*/Pages\b[^>]*?/Count\s+(\d+)|/Count\s+(\d+)[^>]*?/Type\s*/Pages\b", re.S)
_MEDIABOX = re.compile(rb"/MediaBox\s*\[\s*(-?[\d.]+)\s+(-?[\d.]+)\s+(-?[\d.]+)\s+(-?[\d.]+)\s*\]")
_ESC = {ord("n"): b"\n", ord("r"): b"\r", ord("t"): b"\t", ord("b"): b"\b", ord("f"): b"\f",
        ord("("): b"(", ord(")"): b")", ord("\\"): b"\\"}


def _streams(pdf: bytes) -> list[tuple[bytes, bool]]:
    """Every stream's content and whether it was inflated (Flate-compressed streams are; a stream that fails to
    inflate is empty)."""
    out = []
    pos = 0
    while True:
        m = _STREAM.search(pdf, pos)
        if m is None:
            return out
        start = m.end()
        end = pdf.find(b"endstream", start)
        if end < 0:
            return out
        raw = pdf[start:end]
        dict_start = pdf.rfind(b"<<", max(0, m.start() - 2048), m.start())
        head = pdf[dict_start:m.start()] if dict_start >= 0 else b""
        inflated = b"FlateDecode" in head
        if inflated:
            try:
                raw = zlib.decompressobj().decompress(raw)
            except zlib.error:
                raw = b""
        out.append((raw, inflated))
        pos = end + 9


def _literal(s: bytes, i: int) -> tuple[bytes, int]:
    """A PDF literal string starting after its '(' at ``i``: (bytes, index after the closing ')')."""
    out = bytearray()
    depth = 1
    n = len(s)
    while i < n:
        c = s[i]
        if c == 0x5C:  # backslash
            i += 1
            if i >= n:
                break
            e = s[i]
            if e in _ESC:
                out += _ESC[e]
                i += 1
            elif 0x30 <= e <= 0x37:
                j = i
                while j < n and j < i + 3 and 0x30 <= s[j] <= 0x37:
                    j += 1
                out.append(int(s[i:j], 8) & 0xFF)
                i = j
            else:  # a line continuation or an unknown escape: the character itself is dropped / kept
                if e not in (0x0A, 0x0D):
                    out.append(e)
                i += 1
            continue
        if c == 0x28:
            depth += 1
        elif c == 0x29:
            depth -= 1
            if depth == 0:
                return bytes(out), i + 1
        out.append(c)
        i += 1
    return bytes(out), n


_NUMBER = re.compile(rb"[-+]?(?:\d+\.?\d*|\.\d+)")
# in a TJ array, a move left by more than this (thousandths of an em) is a word space
_TJ_SPACE = -200.0


def _shown_text(content: bytes) -> tuple[list[str], int]:
    """Strings shown between BT and ET: (readable pieces, count of glyphs that are not plain text).

    A TJ array is one piece (its strings joined, a large negative kern read as a space); each Tj is a piece."""
    pieces: list[str] = []
    opaque = 0
    i, n = 0, len(content)
    in_text = False
    array: list[str] | None = None

    def shown(text: str) -> None:
        if array is not None:
            array.append(text)
        elif text:
            pieces.append(text)

    while i < n:
        c = content[i]
        if c == 0x28 and in_text:  # (
            s, i = _literal(content, i + 1)
            shown(s.decode("latin-1"))
            continue
        if c == 0x3C and in_text:  # < hex string >, not a << dict
            if i + 1 < n and content[i + 1] == 0x3C:
                i += 2
                continue
            j = content.find(b">", i)
            if j < 0:
                break
            hexs = re.sub(rb"\s", b"", content[i + 1:j])
            try:
                raw = binascii.unhexlify(hexs + b"0" * (len(hexs) % 2))
            except binascii.Error:
                raw = b""
            if raw and all(32 <= b < 127 for b in raw):
                shown(raw.decode("ascii"))
            else:
                opaque += len(raw) // 2 or len(raw)
            i = j + 1
            continue
        if in_text and c == 0x5B:  # [
            array = []
            i += 1
            continue
        if in_text and c == 0x5D and array is not None:  # ]
            text = "".join(array)
            array = None
            if text:
                pieces.append(text)
            i += 1
            continue
        if array is not None and (c in b"-+." or 0x30 <= c <= 0x39):
            m = _NUMBER.match(content, i)
            if m is not None:
                if float(m.group()) < _TJ_SPACE and array and not array[-1].endswith(" "):
                    array.append(" ")
                i = m.end()
                continue
        if c == 0x25:  # % comment to end of line
            j = content.find(b"\n", i)
            i = n if j < 0 else j + 1
            continue
        if c == 0x42 and content[i:i + 2] == b"BT" and (i + 2 >= n or content[i + 2] in b" \t\r\n") \
                and (i == 0 or content[i - 1] in b" \t\r\n"):
            in_text = True
        elif c == 0x45 and content[i:i + 2] == b"ET" and (i + 2 >= n or content[i + 2] in b" \t\r\n") \
                and (i == 0 or content[i - 1] in b" \t\r\n"):
            in_text = False
            array = None
        i += 1
    return pieces, opaque


def _pdf_info(pdf: bytes) -> PdfInfo:
    if not pdf.lstrip()[:5] == b"%PDF-":
        raise MediaError("The PDF specified was not valid.")
    found_streams = _streams(pdf)
    streams = [s for s, _ in found_streams]
    # page objects in the file itself and in compressed object streams (an uncompressed stream is in the file)
    packed = [s for s, inflated in found_streams if inflated and b"/Type" in s]
    pages = len(_PAGE.findall(pdf)) + sum(len(_PAGE.findall(s)) for s in packed)
    if pages == 0:
        counts = [int(a or b) for blob in (pdf, *packed) for a, b in _COUNT.findall(blob)]
        pages = max(counts, default=1) or 1
    texts: list[str] = []
    opaque = 0
    for s in streams:
        if b"BT" in s and b"ET" in s:
            found, op = _shown_text(s)
            texts.extend(found)
            opaque += op
    box = _MEDIABOX.search(pdf)
    if box is None:
        for s in streams:
            box = _MEDIABOX.search(s)
            if box is not None:
                break
    points = LETTER_POINTS
    if box is not None:
        x0, y0, x1, y1 = (float(v) for v in box.groups())
        if abs(x1 - x0) > 0 and abs(y1 - y0) > 0:
            points = (abs(x1 - x0), abs(y1 - y0))
    return PdfInfo(pages=pages, text=" ".join(texts), opaque_glyphs=opaque, page_points=points)


# parsing a PDF inflates all its streams, and one request's PDF is read more than once (validation, counting,
# the prompt-cache plan); keyed by the string object, so nothing here keeps a large PDF alive
_PDF_CACHE: "OrderedDict[tuple[int, int, int], PdfInfo]" = OrderedDict()
_PDF_CACHE_SIZE = 64
_PDF_LOCK = threading.Lock()  # several servers may run in one process, each on its own thread


def pdf_info(data: str) -> PdfInfo:
    """Pages, text and page size of base64 PDF data; ``MediaError`` if it is not a PDF."""
    key = (id(data), hash(data), len(data))
    with _PDF_LOCK:
        hit = _PDF_CACHE.get(key)
        if hit is not None:
            _PDF_CACHE.move_to_end(key)
            return hit
    try:
        raw = base64.b64decode(data, validate=False)
    except (binascii.Error, ValueError):
        raise MediaError("The PDF specified was not valid.") from None
    info = _pdf_info(raw)
    with _PDF_LOCK:
        _PDF_CACHE[key] = info
        if len(_PDF_CACHE) > _PDF_CACHE_SIZE:
            _PDF_CACHE.popitem(last=False)
    return info
