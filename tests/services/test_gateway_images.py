"""Gateway image sources: data: URLs, remote URLs (off by default; fetched with caps when enabled)."""

from __future__ import annotations

import asyncio
import base64
import http.server
import io
import threading

import pytest
from PIL import Image

from stageserve.serving.common.config import load_config
from stageserve.serving.common.errors import BadRequest
from stageserve.serving.gateway.images import read_image_url


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def server():
    body = {"/a.png": _png(), "/big.png": b"x" * 5000}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            data = body.get(self.path)
            self.send_response(200 if data else 404)
            self.end_headers()
            self.wfile.write(data or b"")

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def _read(url: str, **gateway) -> bytes:
    config = load_config(None, {"gateway": gateway, "encoder": {"max_image_bytes": 4096}})
    return asyncio.run(read_image_url(url, "messages.0.content.0.image_url", config))


def test_data_urls_decode_and_bad_ones_are_400():
    assert _read("data:image/png;base64," + base64.b64encode(_png()).decode()) == _png()
    for url, needle in [
        ("data:image/png;base64,@@@", "invalid base64"),
        ("data:image/png,rawbytes", "must be base64"),
        ("ftp://x/a.png", r"data: URL or an http\(s\) URL"),
        ("data:image/png;base64," + "A" * 8000, "larger than 4096 bytes"),
    ]:
        with pytest.raises(BadRequest, match=needle) as info:
            _read(url)
        assert info.value.field == "messages.0.content.0.image_url"


def test_remote_urls_need_the_switch_then_are_fetched_with_a_size_cap(server):
    with pytest.raises(BadRequest, match="remote image URLs are disabled"):
        _read(f"{server}/a.png")
    assert _read(f"{server}/a.png", allow_remote_images=True) == _png()
    with pytest.raises(BadRequest, match="larger than 4096 bytes"):
        _read(f"{server}/big.png", allow_remote_images=True)
    with pytest.raises(BadRequest, match="HTTP 404"):
        _read(f"{server}/missing.png", allow_remote_images=True)
