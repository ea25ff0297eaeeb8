// The inpainting mask, painted on a canvas laid over the input image. The canvas has the
// image's own pixel size; strokes are drawn opaque and shown translucent by CSS. Exported as
// the black-and-white PNG the service expects (white = repainted).

const INK = [255, 72, 104];

export class MaskEditor {
  constructor(canvas, cursor, onChange) {
    this.canvas = canvas;
    this.cursor = cursor;
    this.onChange = onChange;
    this.ctx = canvas.getContext("2d", { willReadFrequently: true });
    this.brush = 32; // in screen pixels: the same feel whatever the image size
    this.erasing = false;
    this.last = null;
    canvas.addEventListener("pointerdown", (e) => this.down(e));
    canvas.addEventListener("pointermove", (e) => this.move(e));
    canvas.addEventListener("pointerup", (e) => this.up(e));
    canvas.addEventListener("pointercancel", (e) => this.up(e));
    canvas.addEventListener("pointerleave", () => { this.cursor.hidden = true; });
  }

  setSize(width, height) {
    this.canvas.width = width;
    this.canvas.height = height;
    this.clear(false);
  }

  scale() {
    const rect = this.canvas.getBoundingClientRect();
    return rect.width ? this.canvas.width / rect.width : 1;
  }

  point(event) {
    const rect = this.canvas.getBoundingClientRect();
    const s = this.scale();
    return [(event.clientX - rect.left) * s, (event.clientY - rect.top) * s];
  }

  stroke(from, to) {
    const ctx = this.ctx;
    ctx.save();
    ctx.globalCompositeOperation = this.erasing ? "destination-out" : "source-over";
    ctx.strokeStyle = ctx.fillStyle = `rgb(${INK.join(",")})`;
    ctx.lineWidth = this.brush * this.scale();
    ctx.lineCap = ctx.lineJoin = "round";
    if (from[0] === to[0] && from[1] === to[1]) {
      ctx.beginPath();
      ctx.arc(to[0], to[1], ctx.lineWidth / 2, 0, Math.PI * 2);
      ctx.fill();
    } else {
      ctx.beginPath();
      ctx.moveTo(from[0], from[1]);
      ctx.lineTo(to[0], to[1]);
      ctx.stroke();
    }
    ctx.restore();
  }

  down(event) {
    if (event.button !== 0) return;
    event.preventDefault();
    this.canvas.setPointerCapture(event.pointerId);
    this.last = this.point(event);
    this.stroke(this.last, this.last);
  }

  move(event) {
    this.showCursor(event);
    if (!this.last) return;
    const next = this.point(event);
    this.stroke(this.last, next);
    this.last = next;
  }

  up(event) {
    if (!this.last) return;
    this.last = null;
    if (this.canvas.hasPointerCapture(event.pointerId)) {
      this.canvas.releasePointerCapture(event.pointerId);
    }
    this.onChange();
  }

  showCursor(event) {
    const parent = this.canvas.parentElement.getBoundingClientRect();
    this.cursor.hidden = false;
    this.cursor.style.width = this.cursor.style.height = `${this.brush}px`;
    this.cursor.style.left = `${event.clientX - parent.left - this.brush / 2}px`;
    this.cursor.style.top = `${event.clientY - parent.top - this.brush / 2}px`;
    this.cursor.classList.toggle("erasing", this.erasing);
  }

  clear(notify = true) {
    this.ctx.clearRect(0, 0, this.canvas.width, this.canvas.height);
    if (notify) this.onChange();
  }

  invert() {
    const { width, height } = this.canvas;
    if (!width || !height) return;
    const image = this.ctx.getImageData(0, 0, width, height);
    const px = image.data;
    for (let i = 0; i < px.length; i += 4) {
      px[i] = INK[0];
      px[i + 1] = INK[1];
      px[i + 2] = INK[2];
      px[i + 3] = 255 - px[i + 3];
    }
    this.ctx.putImageData(image, 0, 0);
    this.onChange();
  }

  // How many pixels the exported mask would repaint.
  paintedPixels() {
    const { width, height } = this.canvas;
    if (!width || !height) return 0;
    const px = this.ctx.getImageData(0, 0, width, height).data;
    let count = 0;
    for (let i = 3; i < px.length; i += 4) if (px[i] >= 128) count += 1;
    return count;
  }

  // The mask as a base64 PNG: white where painted, black elsewhere.
  toBase64() {
    const { width, height } = this.canvas;
    const out = document.createElement("canvas");
    out.width = width;
    out.height = height;
    const octx = out.getContext("2d");
    const source = this.ctx.getImageData(0, 0, width, height).data;
    const image = octx.createImageData(width, height);
    for (let i = 0; i < source.length; i += 4) {
      const v = source[i + 3] >= 128 ? 255 : 0;
      image.data[i] = image.data[i + 1] = image.data[i + 2] = v;
      image.data[i + 3] = 255;
    }
    octx.putImageData(image, 0, 0);
    return out.toDataURL("image/png").split(",", 2)[1];
  }
}
