"""Images and documents over HTTP: count_tokens says what the response bills, both counted from the bytes."""

from __future__ import annotations

import base64
import io

import anthropic
import pytest
from PIL import Image

from runtime.fake_api import media, read_billing
from runtime.fake_api.tokenizer import MESSAGE_OVERHEAD, count_text
from tests.fake_api_fixtures import HAIKU, SONNET, client, start_server, vertex


def _png(w: int, h: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 10, 10)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _pdf_pages(texts: list[str]) -> str:
    """A PDF as a real producer writes it: matplotlib's PDF backend, one page per text."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.backends.backend_pdf import PdfPages

    buf = io.BytesIO()
    with PdfPages(buf) as pdf:
        for t in texts:
            fig = plt.figure(figsize=(8.5, 11))
            fig.text(0.1, 0.5, t)
            pdf.savefig(fig)
            plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def test_count_tokens_equals_billed_input_for_images_and_documents(tmp_path):
    texts = ["Quarterly revenue grew in every region", "Costs were level", "Outlook: steady"]  # no fi/fl ligatures
    pdf = _pdf_pages(texts)
    big, small = _png(3000, 2000), _png(120, 90)
    content = [
        {"type": "text", "text": "Summarise the attachments."},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": big}},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": small}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/chart.png"}},
        {"type": "document", "title": "Q3", "source": {"type": "base64", "media_type": "application/pdf",
                                                       "data": pdf}},
        {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "plain notes here"}},
    ]
    msgs = [{"role": "user", "content": content}]
    page_image = media.image_tokens(int(612 * media.PDF_RENDER_DPI / 72), int(792 * media.PDF_RENDER_DPI / 72))
    want = (MESSAGE_OVERHEAD + count_text("Summarise the attachments.", "v2") + media.image_tokens(3000, 2000)
            + media.image_tokens(120, 90) + media.URL_IMAGE_TOKENS + count_text("Q3", "v2")
            + count_text(" ".join(texts), "v2") + 3 * page_image + count_text("plain notes here", "v2"))
    with start_server(tmp_path) as s:
        c = client(s)
        counted = c.messages.count_tokens(model=HAIKU, messages=msgs).input_tokens
        m = c.messages.create(model=HAIKU, max_tokens=16, messages=msgs)
        assert counted == m.usage.input_tokens == want
        # images dominate: far more than the text around them, and bounded by the per-image cap
        assert media.image_tokens(3000, 2000) <= media.MAX_IMAGE_TOKENS < counted
        assert read_billing(tmp_path / "billing.jsonl")[0]["input_tokens"] == want
        # the Vertex count route counts the same way
        assert vertex(s).messages.count_tokens(model=HAIKU, messages=msgs).input_tokens == want


def test_bad_media_is_refused_before_anything_is_billed(tmp_path):
    with start_server(tmp_path) as s:
        c = client(s)
        wrong_type = [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": _png(4, 4)}}]}]
        with pytest.raises(anthropic.BadRequestError, match="does not match the provided media type"):
            c.messages.create(model=SONNET, max_tokens=5, messages=wrong_type)
        not_pdf = [{"role": "user", "content": [{"type": "document", "source": {
            "type": "base64", "media_type": "application/pdf", "data": base64.b64encode(b"hello").decode()}}]}]
        with pytest.raises(anthropic.BadRequestError, match="PDF specified was not valid"):
            c.messages.count_tokens(model=SONNET, messages=not_pdf)
        assert s.stats()["billed"] == 0
