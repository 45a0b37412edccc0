"""The request path without HTTP or Ray: multipart bodies and the refusals of read_image."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from detr_ray.serve.app import image_from_multipart
from detr_ray.serve.model import RequestError, read_image


def _png(width=80, height=60) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_multipart_gives_the_image_field_byte_for_byte():
    data = _png() + b"\r\n--not-the-boundary\r\n"  # binary, with CRLFs and a boundary-like line inside
    body = (
        b'--B\r\nContent-Disposition: form-data; name="note"\r\n\r\nhi\r\n'
        b'--B\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\nContent-Type: image/png\r\n\r\n'
        + data
        + b"\r\n--B--\r\n"
    )
    assert image_from_multipart(body, "multipart/form-data; boundary=B") == data
    with pytest.raises(RequestError, match="boundary") as e:
        image_from_multipart(body, "multipart/form-data; boundary=other")
    assert e.value.status == 400


@pytest.mark.parametrize(
    "body, status, message",
    [
        (b"", 400, "empty body"),
        (b"GIF89a but not really", 422, "not an image"),
        (_png()[:-40], 422, "cannot decode"),
    ],
)
def test_read_image_refuses_with_a_reason(body, status, message):
    with pytest.raises(RequestError, match=message) as e:
        read_image(body)
    assert e.value.status == status


def test_read_image_pixel_limit_and_good_image():
    pixels, width, height = read_image(_png(), max_pixels=80 * 60)
    assert (width, height) == (80, 60) and tuple(pixels.shape) == (3, 60, 80)
    with pytest.raises(RequestError, match="limit 4799") as e:
        read_image(_png(), max_pixels=80 * 60 - 1)
    assert e.value.status == 413
