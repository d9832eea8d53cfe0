"""How the fake API sizes images and PDFs from their bytes, and what a request with them costs: pure, no server.

Images are encoded by Pillow (a real encoder for each format); PDFs are written here object by object, so the
test knows exactly which pages and text they hold."""

from __future__ import annotations

import base64
import io
import math
import zlib

import pytest
from PIL import Image

from runtime.fake_api import media
from runtime.fake_api.protocol import ApiError
from runtime.fake_api.tokenizer import MESSAGE_OVERHEAD, block_tokens, count_prompt, count_text
from runtime.fake_api.validation import validate
from runtime.settings import default_models

MODELS = default_models()
HAIKU = "claude-haiku-5-5"


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def image(size: tuple[int, int], fmt: str, **save: object) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, (40, 90, 160)).save(buf, fmt, **save)
    return b64(buf.getvalue())


def image_block(data: str, media_type: str) -> dict:
    return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}


def make_pdf(contents: list[bytes], *, size: tuple[float, float] = (612, 792), compress: bool = True,
             packed_pages: bool = False) -> bytes:
    """A PDF with one page per content stream. ``packed_pages`` puts the page objects in a compressed object
    stream (PDF 1.5), where they are invisible in the file's plain bytes."""
    objs: list[bytes] = []
    n = len(contents)
    first_page = 3
    first_content = first_page + n
    objs.append(b"<< /Type /Catalog /Pages 2 0 R >>")
    kids = b" ".join(b"%d 0 R" % (first_page + i) for i in range(n))
    objs.append(b"<< /Type /Pages /Kids [%s] /Count %d /MediaBox [0 0 %g %g] >>" % (kids, n, *size))
    pages = [b"<< /Type /Page /Parent 2 0 R /Contents %d 0 R >>" % (first_content + i) for i in range(n)]
    if not packed_pages:
        objs.extend(pages)
    else:
        objs.extend(b"null" for _ in pages)  # placeholders: the real page objects live in the object stream
    for c in contents:
        if compress:
            z = zlib.compress(c)
            objs.append(b"<< /Length %d /Filter /FlateDecode >>\nstream\n%s\nendstream" % (len(z), z))
        else:
            objs.append(b"<< /Length %d >>\nstream\n%s\nendstream" % (len(c), c))
    if packed_pages:
        body = b" ".join(pages)
        z = zlib.compress(body)
        objs.append(b"<< /Type /ObjStm /N %d /First 0 /Length %d /Filter /FlateDecode >>\nstream\n%s\nendstream"
                    % (n, len(z), z))
    out = bytearray(b"%PDF-1.7\n")
    for i, o in enumerate(objs, start=1):
        out += b"%d 0 obj\n%s\nendobj\n" % (i, o)
    out += b"trailer\n<< /Root 1 0 R >>\n%%EOF\n"
    return bytes(out)


def page(text: bytes) -> bytes:
    return b"BT /F1 12 Tf 72 700 Td " + text + b" ET"


# -- images --------------------------------------------------------------------------------------------------
def test_image_tokens_follow_pixels_over_750_after_downscaling():
    assert media.image_tokens(200, 100) == math.ceil(200 * 100 / 750)
    assert media.image_tokens(750, 1) == 1
    # a long edge over 1568 is scaled down first
    assert media.image_tokens(3136, 100) == media.image_tokens(1568, 50)
    # and the area is capped near 1.15 megapixels, whatever the shape
    for w, h in [(4000, 3000), (1568, 1568), (8000, 8000), (1092, 1092), (1568, 735)]:
        n = media.image_tokens(w, h)
        assert n <= media.MAX_IMAGE_TOKENS and n >= 0.95 * min(w * h, media.MAX_PIXELS) / 750
    assert media.image_tokens(4000, 3000) == media.image_tokens(8000, 6000)


@pytest.mark.parametrize("fmt,media_type,save", [
    ("PNG", "image/png", {}), ("JPEG", "image/jpeg", {}), ("JPEG", "image/jpeg", {"progressive": True}),
    ("GIF", "image/gif", {}), ("WEBP", "image/webp", {}), ("WEBP", "image/webp", {"lossless": True}),
])
@pytest.mark.parametrize("size", [(1, 1), (200, 100), (1601, 37), (3, 3000)])  # small encodes, big edges
def test_image_dimensions_from_each_format(fmt, media_type, save, size):
    data = image(size, fmt, **save)
    assert media.image_info(data) == (media_type, *size)
    assert block_tokens(image_block(data, media_type), "v2") == media.image_tokens(*size)


def test_webp_extended_header_and_jpeg_behind_large_metadata():
    buf = io.BytesIO()
    Image.new("RGBA", (321, 123), (1, 2, 3, 4)).save(buf, "WEBP", exif=b"Exif\x00\x00" + b"\x00" * 64)
    assert media.image_info(b64(buf.getvalue())) == ("image/webp", 321, 123)
    # a 60 KB EXIF segment puts the frame header far past the first few KB decoded
    im = Image.new("RGB", (640, 480))
    exif = im.getexif()
    exif[0x010E] = "x" * 60_000
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif)
    assert buf.getvalue().find(b"\xff\xc0") > 8192
    assert media.image_info(b64(buf.getvalue())) == ("image/jpeg", 640, 480)


@pytest.mark.parametrize("raw", [b"", b"hello world, not an image", b"\x89PNG\r\n\x1a\n\x00\x00", b"\xff\xd8\xff\xe0"])
def test_unreadable_images_are_refused(raw):
    with pytest.raises(media.MediaError):
        media.image_info(b64(raw))


def test_url_and_file_images_cost_the_documented_fixed_amount():
    for src in ({"type": "url", "url": "https://example.com/a.png"}, {"type": "file", "file_id": "file_1"}):
        assert block_tokens({"type": "image", "source": src}, "v2") == media.URL_IMAGE_TOKENS


# -- PDFs ----------------------------------------------------------------------------------------------------
def test_pdf_pages_text_and_page_size():
    pdf = make_pdf([page(b"(Token buckets \\(per minute\\) refill.) Tj"),
                    page(b"[(Over)-250(load) 30(ed) ] TJ <48656C6C6F> Tj"),
                    page(b"<00410042> Tj")], size=(595, 842))
    info = media.pdf_info(b64(pdf))
    assert info.pages == 3
    assert info.text == "Token buckets (per minute) refill. Over loaded Hello"
    assert info.opaque_glyphs == 2  # two 2-byte glyph codes with no readable text
    assert info.page_points == (595.0, 842.0)
    # an A4 page rendered at 150 dpi is over the image limits: it costs the most any image does
    assert info.page_image_tokens == media.image_tokens(int(595 * 150 / 72), int(842 * 150 / 72))
    assert media.MAX_IMAGE_TOKENS - 5 <= info.page_image_tokens <= media.MAX_IMAGE_TOKENS


def test_pdf_pages_inside_compressed_object_streams_and_plain_streams():
    packed = make_pdf([page(b"(one) Tj"), page(b"(two) Tj")], packed_pages=True)
    assert b"/Type /Page " not in packed and media.pdf_info(b64(packed)).pages == 2
    plain = make_pdf([page(b"(plain text) Tj")], compress=False)
    info = media.pdf_info(b64(plain))
    assert (info.pages, info.text) == (1, "plain text")


def test_a_pdf_costs_its_text_plus_one_page_image_per_page():
    texts = [b"(The first page says something.) Tj", b"(The second page says more, with numbers 12345.) Tj"]
    pdf = b64(make_pdf([page(t) for t in texts]))
    info = media.pdf_info(pdf)
    doc = {"type": "document", "title": "Quarterly report", "context": "from finance",
           "source": {"type": "base64", "media_type": "application/pdf", "data": pdf}}
    want = (count_text("Quarterly report", "v2") + count_text("from finance", "v2")
            + count_text(info.text, "v2") + 2 * info.page_image_tokens)
    assert block_tokens(doc, "v2") == want
    # an image-only PDF (what a scanner makes) costs its page images
    buf = io.BytesIO()
    pages = [Image.new("RGB", (850, 1100)) for _ in range(4)]
    pages[0].save(buf, "PDF", save_all=True, append_images=pages[1:])
    scan = media.pdf_info(b64(buf.getvalue()))
    assert scan.pages == 4 and scan.text == ""


def test_text_and_content_documents_count_their_text_and_blocks():
    text = "A plain text document. " * 20
    assert block_tokens({"type": "document", "source": {"type": "text", "media_type": "text/plain",
                                                        "data": text}}, "v1") == count_text(text, "v1")
    png = image((300, 200), "PNG")
    content = [{"type": "text", "text": "chunk one"}, image_block(png, "image/png")]
    doc = {"type": "document", "source": {"type": "content", "content": content}}
    assert block_tokens(doc, "v2") == count_text("chunk one", "v2") + media.image_tokens(300, 200)
    assert block_tokens({"type": "document", "source": {"type": "url", "url": "https://x/y.pdf"}}, "v2") \
        == media.URL_DOCUMENT_TOKENS


def test_a_prompt_with_media_counts_every_part():
    png = image((1000, 500), "PNG")
    pdf = b64(make_pdf([page(b"(hello pdf) Tj")]))
    body = {"model": HAIKU, "max_tokens": 10, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is in these?"}, image_block(png, "image/png"),
        {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": pdf}}]}]}
    info = media.pdf_info(pdf)
    assert count_prompt(body, "v2") == (MESSAGE_OVERHEAD + count_text("What is in these?", "v2")
                                        + media.image_tokens(1000, 500)
                                        + count_text("hello pdf", "v2") + info.page_image_tokens)


# -- validation ----------------------------------------------------------------------------------------------
def _request(block: dict) -> dict:
    return {"model": HAIKU, "max_tokens": 10, "messages": [{"role": "user", "content": [block]}]}


@pytest.mark.parametrize("block,needle", [
    (image_block(image((10, 10), "PNG"), "image/jpeg"), "does not match the provided media type image/jpeg"),
    (image_block(b64(b"garbage bytes here"), "image/png"), "Could not process image"),
    (image_block(image((8001, 2), "PNG"), "image/png"), "8000 pixels"),
    (image_block(image((10, 10), "PNG"), "image/bmp"), "media_type"),
    ({"type": "image", "source": "https://example.com/a.png"}, "valid dictionary"),
    ({"type": "image", "source": {"type": "url"}}, "url: Field required"),
    ({"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": b64(b"not a pdf")}},
     "The PDF specified was not valid"),
    ({"type": "document", "source": {"type": "base64", "media_type": "application/pdf",
                                     "data": b64(make_pdf([page(b"(p) Tj")] * 101))}}, "maximum of 100 PDF pages"),
    ({"type": "document", "source": {"type": "base64", "media_type": "text/html", "data": "eA=="}}, "application/pdf"),
    ({"type": "document", "source": {"type": "content", "content": [{"type": "audio"}]}}, "'text' or 'image'"),
    ({"type": "document", "source": 7}, "valid dictionary"),
])
def test_media_the_api_refuses_is_a_400_naming_the_field(block, needle):
    with pytest.raises(ApiError) as ei:
        validate(_request(block), MODELS)
    assert ei.value.status == 400 and needle in ei.value.message
    assert ei.value.message.startswith("messages.0.content.0")


def test_valid_media_passes_validation():
    for block in (image_block(image((64, 64), "GIF"), "image/gif"),
                  {"type": "image", "source": {"type": "url", "url": "https://example.com/x.png"}},
                  {"type": "document", "source": {"type": "base64", "media_type": "application/pdf",
                                                  "data": b64(make_pdf([page(b"(ok) Tj")]))}},
                  {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "hi"}}):
        assert validate(_request(block), MODELS).model == HAIKU
