"""`fewstep.images`: only the accepted formats are decoded, and a bad or oversized file is
refused with an error naming the field. Input images are read as a browser shows them: EXIF orientation applied, 16-bit samples scaled
(not clipped to white), palette and alpha modes converted, for images, masks and control
images, in every API, the CLI and the page. Chromium itself is the reference where it runs."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from fewstep.errors import InvalidRequest
from fewstep.selftest import sample_image

from helpers.server import assert_typed_error, make_app

ORIENTATION = 0x0112


def encoded(image: Image.Image, format: str, orientation: int | None = None, **kw) -> bytes:
    buffer = io.BytesIO()
    if orientation is not None:
        exif = Image.Exif()
        exif[ORIENTATION] = orientation
        kw["exif"] = exif
    image.save(buffer, format=format, **kw)
    return buffer.getvalue()


def quadrants(width: int = 48, height: int = 32) -> Image.Image:
    """Four flat colours, so any rotation or mirroring shows (and JPEG keeps them flat)."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[: height // 2, : width // 2] = (230, 30, 30)
    pixels[: height // 2, width // 2:] = (30, 230, 30)
    pixels[height // 2:, : width // 2] = (30, 30, 230)
    pixels[height // 2:, width // 2:] = (240, 240, 240)
    return Image.fromarray(pixels)


# what each EXIF orientation asks a viewer to do to the stored pixels (numpy, rows x columns)
UPRIGHT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1, :],
    5: lambda a: np.transpose(a, (1, 0, 2)),
    6: lambda a: np.rot90(a, k=-1),
    7: lambda a: np.transpose(a[::-1, ::-1], (1, 0, 2)),
    8: lambda a: np.rot90(a, k=1),
}


def png16(values: np.ndarray, colour: bool = False) -> bytes:
    """A 16-bit PNG (greyscale or RGB) written by hand: Pillow writes only 8-bit colour."""
    height, width = values.shape[:2]
    kind = 2 if colour else 0
    rows = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(height))

    def chunk(name: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + name + data
                + struct.pack(">I", zlib.crc32(name + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width, height, 16, kind, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


# -- the decoder -------------------------------------------------------------------------------

@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("format", ["JPEG", "WEBP", "PNG"])
def test_exif_orientation_is_applied(orientation, format):
    """JPEG and PNG: as tagged. WebP: as stored, as Chromium shows it (the page's browser)."""
    from fewstep.images import load_image

    stored = quadrants()
    options = {"JPEG": {"quality": 100, "subsampling": 0}, "WEBP": {"lossless": True}}
    data = encoded(stored, format, orientation, **options.get(format, {}))
    expected = UPRIGHT[1 if format == "WEBP" else orientation](np.asarray(stored))
    got = np.asarray(load_image(data, "image"))
    assert got.shape == expected.shape, (got.shape, expected.shape)
    assert np.abs(got.astype(int) - expected).max() <= 12


def test_a_broken_exif_block_leaves_the_image_as_stored():
    from fewstep.images import load_image

    data = encoded(quadrants(), "JPEG", quality=100, subsampling=0)
    # an APP1 segment that claims to be EXIF but is not
    broken = data[:2] + b"\xff\xe1\x00\x10Exif\x00\x00garbage!" + data[2:]
    assert load_image(broken, "image").size == (48, 32)


@pytest.mark.parametrize("fraction", [0.0, 0.31, 0.61, 1.0])
def test_16_bit_greyscale_is_scaled_not_clipped(fraction):
    from fewstep.images import load_image

    value = round(fraction * 65535)
    data = png16(np.full((8, 8), value, np.uint16))
    grey = value >> 8  # what browsers (libpng's strip_16) and Pillow's 16-bit colour keep
    assert load_image(data, "image").getpixel((0, 0)) == (grey, grey, grey)
    assert load_image(data, "mask", mode="L").getpixel((0, 0)) == grey
    assert load_image(data, "image", mode="RGBA").getpixel((0, 0)) == (grey, grey, grey, 255)


def test_16_bit_colour_keeps_its_high_bytes():
    from fewstep.images import load_image

    values = np.zeros((8, 8, 3), np.uint16)
    values[...] = (0.61 * 65535, 0.31 * 65535, 65535)
    got = load_image(png16(values, colour=True), "image").getpixel((0, 0))
    assert got == tuple(int(v) >> 8 for v in values[0, 0])


def test_palette_and_alpha_modes():
    from fewstep.images import load_image

    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putpixel((0, 0), 0)
    data = encoded(palette, "PNG", transparency=0)
    rgba = load_image(data, "image", mode="RGBA")
    assert rgba.getpixel((0, 0))[3] == 0 and rgba.getpixel((1, 1)) == (0, 0, 255, 255)
    la = Image.merge("LA", [Image.new("L", (8, 8), 79), Image.new("L", (8, 8), 255)])
    assert load_image(encoded(la, "PNG"), "mask", mode="L").getpixel((0, 0)) == 79


# -- every API and the CLI ---------------------------------------------------------------------

SMALL = {"steps": 2, "strength": 0.5, "seed": 1}


def sideways(width: int = 64, height: int = 32) -> tuple[bytes, Image.Image]:
    """A phone photo: stored landscape, tagged Orientation=6, shown portrait (height x width)."""
    stored = quadrants(width, height)
    return encoded(stored, "JPEG", 6, quality=95), Image.fromarray(
        np.ascontiguousarray(UPRIGHT[6](np.asarray(stored))))


def mask_for(upright: Image.Image) -> Image.Image:
    mask = Image.new("L", upright.size, 0)
    mask.paste(255, (0, 0, upright.width // 2, upright.height // 2))
    return mask


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png(image: Image.Image) -> bytes:
    return encoded(image, "PNG")


def output_size(b64_text: str) -> tuple[int, int]:
    with Image.open(io.BytesIO(base64.b64decode(b64_text))) as image:
        return image.size


@pytest.fixture(scope="module")
def client():
    with TestClient(make_app(queue_size=4), raise_server_exceptions=False) as c:
        yield c


def test_native_json_and_upload_read_photos_upright(client):
    photo, upright = sideways()
    mask = png(mask_for(upright))
    response = client.post("/v1/inpaint", json={"prompt": "x", "image": b64(photo),
                                                "mask": b64(mask), **SMALL})
    assert response.status_code == 200, response.text
    assert output_size(response.json()["images"][0]["b64"]) == upright.size
    upload = client.post("/v1/inpaint/upload", data={"params": json.dumps({"prompt": "x",
                                                                           **SMALL})},
                         files={"image": ("p.jpg", photo, "image/jpeg"),
                                "mask": ("m.png", mask, "image/png")})
    assert upload.status_code == 200, upload.text
    assert output_size(upload.json()["images"][0]["b64"]) == upright.size


def test_control_images_are_read_upright(client):
    photo, upright = sideways()
    response = client.post("/v1/controlnet", json={
        "prompt": "x", "control_image": b64(photo), "controlnet": "canny", "steps": 1,
        "seed": 1})
    assert response.status_code == 200, response.text
    assert output_size(response.json()["images"][0]["b64"]) == upright.size
    preview = client.post("/v1/control/canny", json={"image": b64(photo)})
    assert output_size(preview.json()["image"]) == upright.size


def test_openai_and_a1111_read_photos_upright(client):
    photo, upright = sideways()
    mask = png(mask_for(upright))
    edit = client.post("/v1/images/edits", data={"prompt": "x", "steps": "2", "seed": "1",
                                                 "strength": "0.5"},
                       files={"image": ("p.jpg", photo, "image/jpeg"),
                              "mask": ("m.png", mask, "image/png")})
    assert edit.status_code == 200, edit.text
    assert output_size(edit.json()["data"][0]["b64_json"]) == upright.size
    a1111 = client.post("/sdapi/v1/img2img", json={
        "prompt": "x", "init_images": [b64(photo)], "mask": b64(mask), "steps": 2,
        "denoising_strength": 0.5, "seed": 1})
    assert a1111.status_code == 200, a1111.text
    assert output_size(a1111.json()["images"][0]) == upright.size


def test_a_16_bit_mask_is_read_as_its_grey(client):
    """A 31 % grey 16-bit mask is dark, as shown: it must not count as white (repaint all)."""
    from fewstep.server.convert.common import decode_image
    from fewstep.config import Settings

    mask = png16(np.full((64, 64), round(0.31 * 65535), np.uint16))
    assert decode_image(b64(mask), "mask", Settings(), mode="L").getpixel((0, 0)) == 79
    image = png(quadrants(64, 64))
    response = client.post("/v1/inpaint", json={"prompt": "x", "image": b64(image),
                                                "mask": b64(mask), **SMALL})
    assert response.status_code == 200, response.text


def test_the_cli_reads_photos_upright(tiny, tmp_path):
    from fewstep.cli import main

    photo, upright = sideways()
    (tmp_path / "photo.jpg").write_bytes(photo)
    mask_for(upright).save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    assert main(["inpaint", "x", "--image", str(tmp_path / "photo.jpg"), "--mask",
                 str(tmp_path / "mask.png"), "--model", str(tiny.sd15), "--lcm-lora",
                 str(tiny.lcm_sd15), "--device", "cpu", "--quiet", "--steps", "2",
                 "--strength", "0.5", "--seed", "1", "--out", str(out)]) == 0
    with Image.open(out) as image:
        assert image.size == upright.size


def test_a_mask_sized_from_the_stored_photo_is_refused(client):
    """Sized from the stored (sideways) pixels, the mask no longer fits what is shown."""
    photo, upright = sideways()
    stored_mask = png(Image.new("L", (upright.height, upright.width), 255))
    response = client.post("/v1/inpaint", json={"prompt": "x", "image": b64(photo),
                                                "mask": b64(stored_mask), **SMALL})
    assert_typed_error(response, 422, field="mask")


# -- Chromium as the reference ---------------------------------------------------------------

def browser_cases() -> dict[str, tuple[bytes, str]]:
    photo = quadrants()
    grey16 = np.tile(np.linspace(0, 65535, 16, dtype=np.uint16), (8, 1))
    rgb16 = np.stack([grey16, grey16[:, ::-1], np.full_like(grey16, 40000)], axis=-1)
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([255, 0, 0, 10, 200, 90] + [0] * 762)
    cases = {f"jpeg-orientation-{o}": (encoded(photo, "JPEG", o, quality=100, subsampling=0),
                                       "image/jpeg")
             for o in range(1, 9)}
    cases["webp-orientation-6"] = (encoded(photo, "WEBP", 6, lossless=True), "image/webp")
    cases["png-orientation-7"] = (encoded(photo, "PNG", 7), "image/png")
    cases["png-16-bit-grey"] = (png16(grey16), "image/png")
    cases["png-16-bit-rgb"] = (png16(rgb16, colour=True), "image/png")
    cases["png-palette"] = (encoded(palette, "PNG"), "image/png")
    cases["gif"] = (encoded(palette, "GIF"), "image/gif")
    return cases


def test_images_decode_as_chromium_shows_them():
    from helpers.studio import launch_args, require_browser
    from playwright.sync_api import sync_playwright

    from fewstep.images import load_image

    executable = require_browser()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=launch_args())
        try:
            page = browser.new_page()
            for name, (data, media) in browser_cases().items():
                shown = page.evaluate("""async ([data, media]) => {
                    const image = new Image();
                    image.src = `data:${media};base64,${data}`;
                    await image.decode();
                    const canvas = document.createElement("canvas");
                    canvas.width = image.naturalWidth;
                    canvas.height = image.naturalHeight;
                    const context = canvas.getContext("2d");
                    context.drawImage(image, 0, 0);
                    const pixels = context.getImageData(0, 0, canvas.width, canvas.height);
                    return [canvas.width, canvas.height, Array.from(pixels.data)];
                }""", [base64.b64encode(data).decode(), media])
                width, height, pixels = shown
                expected = np.array(pixels, np.int32).reshape(height, width, 4)[..., :3]
                got = np.asarray(load_image(data, "image"), np.int32)
                assert got.shape == expected.shape, (name, got.shape, expected.shape)
                tolerance = 6 if "jpeg" in name else 1  # JPEG decoders round differently
                assert np.abs(got - expected).max() <= tolerance, name
        finally:
            browser.close()


# -- formats and bounds -----------------------------------------------------------------

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
