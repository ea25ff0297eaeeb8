"""`fewstep.images`: only the accepted formats are decoded, and a bad or oversized file is refused
with an error naming the field."""

import pytest

from fewstep.errors import InvalidRequest
from fewstep.selftest import sample_image


def test_unreadable_image(tmp_path):
    from fewstep.images import load_image

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(InvalidRequest) as info:
        load_image(bad, "mask")
    assert info.value.field == "mask"
    good = tmp_path / "good.png"
    sample_image().save(good)
    good.write_bytes(good.read_bytes()[:200])  # truncated
    with pytest.raises(InvalidRequest):
        load_image(good, "image")
    with pytest.raises(InvalidRequest) as info:
        load_image(tmp_path / "none.png", "control_image")
    assert "no such file" in info.value.message


def test_decompression_bomb(tmp_path):
    from PIL import Image

    from fewstep.images import load_image

    path = tmp_path / "big.png"
    Image.new("L", (5000, 5000)).save(path)
    with pytest.raises(InvalidRequest) as info:
        load_image(path, "image", max_pixels=4096 * 4096)
    assert "limit" in info.value.message
