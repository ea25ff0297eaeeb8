// fewstep studio: the page's behaviour. Everything goes through the service's public API
// (api.js); the page holds at most one job on the server and one waiting request of its own.

import { Api, ApiError } from "./api.js";
import { History } from "./history.js";
import { JobRunner } from "./jobs.js";
import { MaskEditor } from "./mask.js";
import { pngSettings } from "./pnginfo.js";

const $ = (id) => document.getElementById(id);

const TASKS = ["txt2img", "img2img", "inpaint", "controlnet", "t2i-adapter", "animate"];
const IMAGE_TASKS = new Set(["img2img", "inpaint", "controlnet", "t2i-adapter"]);
const CONTROL_TASKS = new Set(["controlnet", "t2i-adapter"]);
const TASK_TITLES = {
  txt2img: "text to image", img2img: "image to image", inpaint: "inpaint",
  controlnet: "ControlNet", "t2i-adapter": "T2I-Adapter", animate: "animation",
};
// The recipe's defaults per task (the service's own defaults); each task remembers its values.
const TASK_DEFAULTS = {
  txt2img: { steps: 4, guidance: 1.0 },
  img2img: { steps: 4, guidance: 1.0, strength: 0.6 },
  inpaint: { steps: 4, guidance: 4.0, strength: 1.0 },
  controlnet: { steps: 4, guidance: 1.5, conditioning_scale: 0.8 },
  "t2i-adapter": { steps: 4, guidance: 1.5, conditioning_scale: 0.8, conditioning_factor: 1.0 },
  animate: { steps: 5, guidance: 1.25 },
};
const PER_TASK = ["steps", "guidance", "strength", "conditioning_scale", "conditioning_factor"];
const SIZE_PRESETS = {
  sd15: [[512, 512], [512, 768], [768, 512], [448, 640], [640, 448], [768, 768]],
  sdxl: [[1024, 1024], [896, 1152], [1152, 896], [832, 1216], [1216, 832], [768, 1344],
    [1344, 768]],
};
// request field -> form control id (numbers)
const NUMBERS = {
  steps: "steps", guidance: "guidance", strength: "strength", width: "width", height: "height",
  num_images: "num-images", conditioning_scale: "conditioning-scale",
  conditioning_factor: "conditioning-factor", num_frames: "frames", fps: "fps",
  canny_low: "canny-low", canny_high: "canny-high",
};
const INTEGERS = new Set(["steps", "width", "height", "num_images", "num_frames", "fps",
  "canny_low", "canny_high"]);
const REALTIME_DEBOUNCE_MS = 300;
const CANNY_DEBOUNCE_MS = 120;

const api = new Api();
const history = new History();
const mask = new MaskEditor($("mask-canvas"), $("brush-cursor"), () => onInputChanged());

const state = {
  task: "txt2img",
  catalog: null, // GET /v1/models
  loraNames: [],
  perTask: Object.fromEntries(TASKS.map((t) => [t, { ...TASK_DEFAULTS[t] }])),
  image: null, // {b64, url, width, height, name}
  imageSettings: null, // the settings the input image's file carries, if any
  lastSeed: null,
  realtimeTimer: null,
  cannyTimer: null,
  cannySeq: 0,
  resultUrls: [],
};

// -- small helpers ----------------------------------------------------------------------------

class FieldError extends Error {
  constructor(message, field) {
    super(message);
    this.field = field;
  }
}

function setStatus(text) {
  $("status").textContent = text;
}

function setAppState(value) {
  $("app").dataset.state = value;
  $("progress").dataset.state = value;
}

function b64ToBlob(b64, type) {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  return new Blob([bytes], { type });
}

function roundTo(value, multiple) {
  return Math.max(multiple, Math.floor(value / multiple) * multiple);
}

function ago(timestamp) {
  const s = Math.round((Date.now() - timestamp) / 1000);
  if (s < 60) return "just now";
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return new Date(timestamp).toLocaleDateString();
}

function visible(element) {
  for (let el = element; el; el = el.parentElement) if (el.hidden) return false;
  return true;
}

// -- errors next to the field they name -------------------------------------------------------

function fieldContainer(field) {
  if (!field) return null;
  const names = [field, field.split(".")[0]];
  for (const name of names) {
    for (const el of document.querySelectorAll(`[data-field~="${CSS.escape(name)}"]`)) {
      if (visible(el)) return el;
    }
  }
  return null;
}

function showError(error) {
  const el = $("error");
  const field = error.field || null;
  if (error.status === 401 || field === "authorization") {
    askKey(api.key ? "The server refused this key: check it and enter it again." : null);
    return;
  }
  clearError();
  const container = fieldContainer(field);
  el.textContent = error.message || String(error);
  el.dataset.field = field || "";
  el.hidden = false;
  if (container) {
    container.append(el);
    container.classList.add("invalid");
    for (const input of container.querySelectorAll("input, textarea, select")) {
      input.setAttribute("aria-invalid", "true");
      input.setAttribute("aria-errormessage", "error");
    }
  } else {
    $("error-home").append(el);
  }
  el.scrollIntoView({ block: "nearest" });
}

function clearError() {
  const el = $("error");
  el.hidden = true;
  el.textContent = "";
  $("error-home").append(el);
  for (const c of document.querySelectorAll(".invalid")) c.classList.remove("invalid");
  for (const i of document.querySelectorAll("[aria-invalid]")) {
    i.removeAttribute("aria-invalid");
    i.removeAttribute("aria-errormessage");
  }
}

// -- API key ----------------------------------------------------------------------------------

function askKey(message) {
  const dialog = $("key-dialog");
  const text = $("key-message");
  text.textContent = message || "";
  text.hidden = !message;
  $("api-key").value = "";
  if (!dialog.open) dialog.showModal();
  $("api-key").focus();
  setStatus("Waiting for the API key.");
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const key = $("api-key").value.trim();
  if (!key) return;
  api.setKey(key);
  $("key-dialog").close();
  $("key-button").hidden = false;
  loadCatalog();
});

$("key-dialog").addEventListener("cancel", (event) => event.preventDefault()); // Esc: stay
$("key-button").addEventListener("click", () => askKey(null));

// -- the catalogue and the tasks it supports ---------------------------------------------------

function unsupported(task) {
  const c = state.catalog;
  const model = c.data[0];
  if (!c.workflows.includes(task)) return "not offered by this server";
  if (model.inpaint_only && task !== "inpaint") return "this is an inpainting model";
  if (task === "controlnet" && !c.controlnets.length) return "no ControlNet in the catalogue";
  if (task === "t2i-adapter" && !c.adapters.length) return "no T2I-Adapter in the catalogue";
  if (task === "animate") {
    if (!c.motion_adapters.length) return "no motion adapter in the catalogue";
    if (model.family !== "sd15") return "animation needs a Stable Diffusion 1.5 model";
  }
  return null;
}

async function loadCatalog() {
  setStatus("Loading the catalogue…");
  try {
    const [catalog, loras] = await Promise.all([api.get("/v1/models"), api.get("/v1/loras")]);
    state.catalog = catalog;
    state.loraNames = loras.data.map((l) => l.name);
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) {
      askKey(api.key ? "The server refused this key: check it and enter it again." : null);
      return;
    }
    setAppState("offline");
    showError(err);
    setStatus("Not connected.");
    return;
  }
  const model = state.catalog.data[0];
  $("model-info").textContent =
    `${model.id} · ${model.family} · ${model.native_size} px native`;
  $("key-button").hidden = !api.key;
  for (const tab of document.querySelectorAll("[data-task]")) {
    const reason = unsupported(tab.dataset.task);
    tab.disabled = Boolean(reason);
    tab.title = reason ? `Not available: ${reason}` : "";
  }
  fillSelect($("controlnet"), state.catalog.controlnets);
  fillSelect($("adapter"), state.catalog.adapters);
  fillSelect($("motion-adapter"), state.catalog.motion_adapters);
  renderLoras();
  const size = model.native_size;
  if (!$("width").dataset.touched) {
    $("width").value = size;
    $("height").value = size;
  }
  const task = unsupported(state.task) ? TASKS.find((t) => !unsupported(t)) : state.task;
  selectTask(task || "txt2img");
  clearError();
  setAppState("idle");
  setStatus("Ready.");
  $("generate").disabled = false;
}

function fillSelect(select, names) {
  const current = select.value;
  select.replaceChildren(...names.map((name) => new Option(name, name)));
  if (names.includes(current)) select.value = current;
}

function renderLoras() {
  const list = $("lora-list");
  if (!state.loraNames.length) {
    list.replaceChildren(Object.assign(document.createElement("p"), {
      className: "hint", textContent: "None in this server's catalogue." }));
    return;
  }
  list.replaceChildren(...state.loraNames.map((name) => {
    const row = document.createElement("div");
    row.className = "lora-row";
    row.dataset.lora = name;
    const id = `lora-${name}`;
    row.innerHTML = `
      <label class="switch small"><input type="checkbox" class="lora-on" role="switch">
        <span class="lora-name"></span></label>
      <div class="slider-pair">
        <input type="range" class="lora-range" min="-2" max="2" step="0.05" value="1"
               tabindex="-1">
        <input type="number" class="lora-weight" min="-4" max="4" step="0.05" value="1">
      </div>`;
    row.querySelector(".lora-name").textContent = name;
    const toggle = row.querySelector(".lora-on");
    toggle.dataset.testid = `lora-toggle-${name}`;
    toggle.setAttribute("aria-label", `Use LoRA ${name}`);
    const weight = row.querySelector(".lora-weight");
    weight.id = id;
    weight.dataset.testid = id;
    weight.setAttribute("aria-label", `Weight of LoRA ${name}`);
    const range = row.querySelector(".lora-range");
    range.setAttribute("aria-label", `Weight of LoRA ${name} (slider)`);
    pairSlider(range, weight);
    // moving the weight of a LoRA that is off turns it on: that is what the hand means
    weight.addEventListener("input", () => { toggle.checked = true; syncLoraRow(row); });
    range.addEventListener("input", () => { toggle.checked = true; syncLoraRow(row); });
    toggle.addEventListener("change", () => { syncLoraRow(row); onInputChanged(); });
    syncLoraRow(row);
    return row;
  }));
}

function syncLoraRow(row) {
  row.classList.toggle("off", !row.querySelector(".lora-on").checked);
}

function chosenLoras() {
  return [...document.querySelectorAll(".lora-row")]
    .filter((row) => row.querySelector(".lora-on").checked)
    .map((row) => ({ name: row.dataset.lora,
      weight: readNumber(row.querySelector(".lora-weight"), `loras.${row.dataset.lora}`) }));
}

// -- tasks ------------------------------------------------------------------------------------

function selectTask(task) {
  if (state.task !== task) saveTaskValues(state.task);
  state.task = task;
  for (const tab of document.querySelectorAll("[data-task]")) {
    const on = tab.dataset.task === task;
    tab.setAttribute("aria-selected", String(on));
    tab.tabIndex = on ? 0 : -1;
  }
  for (const el of document.querySelectorAll("[data-tasks]")) {
    if (el.closest("template")) continue;
    el.hidden = !el.dataset.tasks.split(" ").includes(task);
  }
  $("mask-canvas").hidden = task !== "inpaint";
  loadTaskValues(task);
  fillSizePresets();
  updateImageMeta();
  clearError();
  syncNegativeHint();
  if (CONTROL_TASKS.has(task)) scheduleCanny(0);
}

function saveTaskValues(task) {
  for (const name of PER_TASK) {
    if (name in TASK_DEFAULTS[task]) state.perTask[task][name] = $(NUMBERS[name]).value;
  }
}

function loadTaskValues(task) {
  for (const name of PER_TASK) {
    if (name in TASK_DEFAULTS[task]) setNumber(name, state.perTask[task][name]);
  }
}

function setNumber(name, value) {
  const input = $(NUMBERS[name]);
  input.value = value;
  const range = $(`${NUMBERS[name]}-range`);
  if (range) range.value = value;
}

for (const tab of document.querySelectorAll("[data-task]")) {
  tab.addEventListener("click", () => { selectTask(tab.dataset.task); onInputChanged(); });
  tab.addEventListener("keydown", (event) => {
    if (event.key !== "ArrowRight" && event.key !== "ArrowLeft") return;
    const tabs = [...document.querySelectorAll("[data-task]")].filter((t) => !t.disabled);
    const i = tabs.indexOf(tab) + (event.key === "ArrowRight" ? 1 : -1);
    const next = tabs[(i + tabs.length) % tabs.length];
    next.focus();
    selectTask(next.dataset.task);
  });
}

// -- sizes ------------------------------------------------------------------------------------

function fillSizePresets() {
  const select = $("size-preset");
  const options = [];
  if (IMAGE_TASKS.has(state.task) && state.image) {
    const { own, fitted } = imageSizes();
    if (fitted !== own) {
      options.push(new Option(`Image scaled to the native area (${fitted.join(" × ")})`,
        fitted.join("x")));
    }
    const rounded = own[0] !== state.image.width || own[1] !== state.image.height;
    options.push(new Option(rounded ? `Image size, rounded to multiples of 8 (${own.join(" × ")})`
      : `Image size (${own.join(" × ")})`, own.join("x")));
  }
  if (state.catalog) {
    const model = state.catalog.data[0];
    const native = model.native_size;
    const presets = (SIZE_PRESETS[model.family === "sd15" ? "sd15" : "sdxl"] || []).slice();
    if (!presets.some(([w, h]) => w === native && h === native)) presets.unshift([native, native]);
    for (const [w, h] of presets) {
      const label = w === native && h === native ? `${w} × ${h} (native)` : `${w} × ${h}`;
      const value = `${w}x${h}`;
      if (!options.some((o) => o.value === value)) options.push(new Option(label, value));
    }
  }
  options.push(new Option("Custom", "custom"));
  select.replaceChildren(...options);
  syncSizePreset();
}

function syncSizePreset() {
  const value = `${$("width").value}x${$("height").value}`;
  const select = $("size-preset");
  select.value = [...select.options].some((o) => o.value === value) ? value : "custom";
  updateImageMeta();
}

// The sizes an input image offers: `own`, its size rounded down to multiples of 8 (which the
// model needs), and `fitted`, the size it gets by default: its own, or scaled down to the
// model's native area when it is larger (a 12-megapixel photo would be slow and off-model).
function imageSizes() {
  const { width, height } = state.image;
  const own = [roundTo(width, 8), roundTo(height, 8)];
  const native = state.catalog ? state.catalog.data[0].native_size : 512;
  const area = native * native;
  if (width * height <= area) return { own, fitted: own };
  const s = Math.sqrt(area / (width * height));
  return { own, fitted: [roundTo(width * s, 8), roundTo(height * s, 8)] };
}

// The input image's name and size, and, when the request's size differs, that the service
// resizes it to that size and why (said, so a smaller result is no surprise).
function updateImageMeta() {
  if (!state.image) return;
  const { name, width, height } = state.image;
  let text = `${name} · ${width} × ${height}`;
  const target = [Number($("width").value), Number($("height").value)];
  if (target[0] > 0 && target[1] > 0 && (target[0] !== width || target[1] !== height)) {
    const { own, fitted } = imageSizes();
    const is = (size) => size[0] === target[0] && size[1] === target[1];
    const why = is(own) ? "rounded down to multiples of 8"
      : is(fitted) ? "scaled down to the model's native area; its own size is under Size"
        : "the width and height below";
    text += ` · generated at ${target[0]} × ${target[1]} (${why})`;
  }
  $("image-meta").textContent = text;
}

$("size-preset").addEventListener("change", () => {
  const value = $("size-preset").value;
  if (value === "custom") return;
  const [w, h] = value.split("x").map(Number);
  $("width").value = w;
  $("height").value = h;
  $("width").dataset.touched = "1";
  updateImageMeta();
  onInputChanged();
});
for (const id of ["width", "height"]) {
  $(id).addEventListener("input", () => {
    $(id).dataset.touched = "1";
    syncSizePreset();
    onInputChanged();
  });
}

// -- numbers and sliders ----------------------------------------------------------------------

function pairSlider(range, number) {
  range.addEventListener("input", () => { number.value = range.value; });
  number.addEventListener("input", () => {
    if (number.value !== "") range.value = number.value;
  });
}

for (const id of Object.values(NUMBERS)) {
  const range = $(`${id}-range`);
  if (range) pairSlider(range, $(id));
}

function readNumber(input, field) {
  const text = input.value.trim();
  const value = Number(text);
  if (text === "" || !Number.isFinite(value)) {
    throw new FieldError(`${field}: enter a number`, field);
  }
  if (INTEGERS.has(field) && !Number.isInteger(value)) {
    throw new FieldError(`${field}: must be a whole number, got ${text}`, field);
  }
  return value;
}

// The negative prompt only acts with classifier-free guidance (guidance above 1): the hint is
// shown while it has no effect, and only then.
function syncNegativeHint() {
  const guidance = Number($("guidance").value);
  const inert = Number.isFinite(guidance) && guidance <= 1;
  $("negative-field").classList.toggle("inert", inert);
  $("negative-hint").hidden = !inert;
  // a hidden element still describes the field it is named by: name it only while shown
  if (inert) $("negative").setAttribute("aria-describedby", "negative-hint");
  else $("negative").removeAttribute("aria-describedby");
  $("negative-hint").classList.toggle("warn", inert && $("negative").value.trim() !== "");
}
$("guidance").addEventListener("input", syncNegativeHint);
$("guidance-range").addEventListener("input", syncNegativeHint);
$("negative").addEventListener("input", syncNegativeHint);

// -- seeds ------------------------------------------------------------------------------------

$("seed-random").addEventListener("click", () => { $("seed").value = ""; onInputChanged(); });
$("seed-reuse").addEventListener("click", () => {
  if (state.lastSeed === null) return;
  $("seed").value = state.lastSeed;
  onInputChanged();
});

function setLastSeed(seed) {
  state.lastSeed = seed;
  $("seed-reuse").disabled = false;
  $("seed-reuse").title = `Reuse the last seed (${seed})`;
}

// -- the input image --------------------------------------------------------------------------

const DIRECT_TYPES = new Set(["image/png", "image/jpeg", "image/webp"]);

async function loadImageFile(file) {
  if (!file || !file.type.startsWith("image/")) {
    showError(new FieldError("image: that is not an image file", "image"));
    return;
  }
  const url = URL.createObjectURL(file);
  const img = new Image();
  img.src = url;
  try {
    await img.decode();
  } catch {
    URL.revokeObjectURL(url);
    showError(new FieldError(`image: ${file.name || "the file"} could not be read`, "image"));
    return;
  }
  let b64;
  if (DIRECT_TYPES.has(file.type)) {
    b64 = await new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(String(reader.result).split(",", 2)[1]);
      reader.onerror = () => reject(reader.error);
      reader.readAsDataURL(file);
    });
  } else { // GIF, BMP, ...: sent as PNG (the first frame)
    const canvas = document.createElement("canvas");
    canvas.width = img.naturalWidth;
    canvas.height = img.naturalHeight;
    canvas.getContext("2d").drawImage(img, 0, 0);
    b64 = canvas.toDataURL("image/png").split(",", 2)[1];
  }
  setInputImage({ b64, url, width: img.naturalWidth, height: img.naturalHeight,
    name: file.name || "pasted image" });
  offerImageSettings(file);
}

// An input image that carries settings (an output of this service, say) offers them with a
// button; they are not applied by themselves.
async function offerImageSettings(blob) {
  const image = state.image;
  const settings = await pngSettings(blob).catch(() => null);
  if (state.image !== image || !settings) return; // another image came meanwhile
  state.imageSettings = settings;
  $("image-settings").hidden = false;
}

$("image-settings").addEventListener("click", () => {
  if (!state.imageSettings) return;
  const { task, ...settings } = state.imageSettings; // the image stays this task's input
  applySettings(settings, `Settings read from ${state.image.name}`);
});

function setInputImage(image) {
  if (state.image?.url?.startsWith("blob:")) URL.revokeObjectURL(state.image.url);
  state.imageSettings = null; // until offerImageSettings finds some in this one
  $("image-settings").hidden = true;
  state.image = image;
  $("input-image").src = image.url;
  $("input-image").classList.toggle("pixelated", image.width < 256);
  $("image-stage").style.setProperty("--aspect", String(image.width / image.height));
  $("image-stage").hidden = false;
  $("drop-zone").classList.add("has-image");
  mask.setSize(image.width, image.height);
  const [w, h] = imageSizes().fitted;
  $("width").value = w;
  $("height").value = h;
  fillSizePresets();
  updateImageMeta();
  clearError();
  scheduleCanny(0);
  onInputChanged();
}

$("image-input").addEventListener("change", () => {
  const file = $("image-input").files[0];
  if (file) loadImageFile(file);
  $("image-input").value = ""; // choosing the same file again still loads it
});

const dropZone = $("drop-zone");
dropZone.addEventListener("dragover", (event) => {
  event.preventDefault();
  dropZone.classList.add("dragging");
});
dropZone.addEventListener("dragleave", () => dropZone.classList.remove("dragging"));
dropZone.addEventListener("drop", (event) => {
  event.preventDefault();
  dropZone.classList.remove("dragging");
  const file = [...(event.dataTransfer?.files || [])].find((f) => f.type.startsWith("image/"));
  if (file) loadImageFile(file);
});
document.addEventListener("paste", (event) => {
  const item = [...(event.clipboardData?.items || [])].find((i) => i.type.startsWith("image/"));
  if (!item) return; // text pastes go to the text fields as usual
  event.preventDefault();
  if (!IMAGE_TASKS.has(state.task)) selectTask(unsupported("img2img") ? state.task : "img2img");
  loadImageFile(item.getAsFile());
});
dropZone.addEventListener("keydown", (event) => {
  if ((event.key === "Enter" || event.key === " ") && event.target === dropZone) {
    event.preventDefault();
    $("image-input").click();
  }
});

// -- the mask ---------------------------------------------------------------------------------

function setTool(erasing) {
  mask.erasing = erasing;
  $("mask-paint").setAttribute("aria-pressed", String(!erasing));
  $("mask-eraser").setAttribute("aria-pressed", String(erasing));
}
$("mask-paint").addEventListener("click", () => setTool(false));
$("mask-eraser").addEventListener("click", () => setTool(true));
$("mask-clear").addEventListener("click", () => mask.clear());
$("mask-invert").addEventListener("click", () => mask.invert());
$("brush-size").addEventListener("input", () => { mask.brush = Number($("brush-size").value); });
mask.brush = Number($("brush-size").value);

// -- the canny preview ------------------------------------------------------------------------

function scheduleCanny(delay = CANNY_DEBOUNCE_MS) {
  clearTimeout(state.cannyTimer);
  state.cannyTimer = setTimeout(updateCanny, delay);
}

async function updateCanny() {
  if (!CONTROL_TASKS.has(state.task) || !state.image) return;
  const preview = $("control-preview");
  const caption = $("control-caption");
  const seq = ++state.cannySeq;
  if (!$("canny").checked) {
    preview.src = state.image.url;
    preview.hidden = false;
    delete preview.dataset.low;
    delete preview.dataset.high;
    caption.textContent = "The image is used as the edge map as it is.";
    return;
  }
  let low;
  let high;
  try {
    low = readNumber($("canny-low"), "canny_low");
    high = readNumber($("canny-high"), "canny_high");
  } catch (err) {
    showError(err);
    return;
  }
  preview.classList.add("stale");
  try {
    const answer = await api.post("/v1/control/canny", { image: state.image.b64, low, high });
    if (seq !== state.cannySeq) return; // a newer threshold is on its way
    preview.src = `data:image/png;base64,${answer.image}`;
    preview.dataset.low = String(low);
    preview.dataset.high = String(high);
    preview.hidden = false;
    caption.textContent = `Canny edges, thresholds ${low}–${high}: what the model will follow.`;
    if (["canny_low", "canny_high", "image"].includes($("error").dataset.field)) clearError();
  } catch (err) {
    // the endpoint names its own fields; the page's are the request's
    const field = { low: "canny_low", high: "canny_high" }[err.field] || err.field;
    if (seq === state.cannySeq) showError({ status: err.status, message: err.message, field });
  } finally {
    if (seq === state.cannySeq) preview.classList.remove("stale");
  }
}

for (const id of ["canny-low", "canny-high"]) {
  $(id).addEventListener("input", () => { scheduleCanny(); onInputChanged(); });
  $(`${id}-range`).addEventListener("input", () => { scheduleCanny(); onInputChanged(); });
}
$("canny").addEventListener("change", () => { scheduleCanny(0); onInputChanged(); });

// -- building a request -----------------------------------------------------------------------

function collectSettings() {
  const settings = {
    task: state.task,
    prompt: $("prompt").value,
    negative: $("negative").value,
    seed: $("seed").value.trim(),
    loras: chosenLoras(),
    controlnet: $("controlnet").value,
    adapter: $("adapter").value,
    motion_adapter: $("motion-adapter").value,
    canny: $("canny").checked,
  };
  for (const [field, id] of Object.entries(NUMBERS)) settings[field] = $(id).value;
  return settings;
}

function buildJob() {
  const task = state.task;
  const number = (field) => readNumber($(NUMBERS[field]), field);
  const body = {
    prompt: $("prompt").value,
    steps: number("steps"),
    guidance: number("guidance"),
    width: number("width"),
    height: number("height"),
    num_images: number("num_images"),
    loras: chosenLoras(),
  };
  const negative = $("negative").value.trim();
  if (negative) body.negative_prompt = negative;
  const seedText = $("seed").value.trim();
  if (seedText) body.seed = readNumber($("seed"), "seed");
  if (IMAGE_TASKS.has(task) && !state.image) {
    throw new FieldError("image: choose an input image first (file, drop or paste)", "image");
  }
  if (task === "img2img" || task === "inpaint") {
    body.image = state.image.b64;
    body.strength = number("strength");
  }
  if (task === "inpaint") {
    if (!mask.paintedPixels()) {
      throw new FieldError("mask: paint the area to repaint on the image", "mask");
    }
    body.mask = mask.toBase64();
  }
  if (CONTROL_TASKS.has(task)) {
    body.control_image = state.image.b64;
    body.canny = $("canny").checked;
    body.canny_low = number("canny_low");
    body.canny_high = number("canny_high");
    body.conditioning_scale = number("conditioning_scale");
  }
  if (task === "controlnet") body.controlnet = $("controlnet").value;
  if (task === "t2i-adapter") {
    body.adapter = $("adapter").value;
    body.conditioning_factor = number("conditioning_factor");
  }
  if (task === "animate") {
    body.motion_adapter = $("motion-adapter").value;
    body.num_frames = number("num_frames");
    body.fps = number("fps");
  }
  return { task, body, settings: collectSettings() };
}

// -- running jobs -----------------------------------------------------------------------------

const runner = new JobRunner(api, {
  phase: setAppState,
  status: setStatus,
  started(job) {
    setBusy(true);
    setAppState("submitting");
    $("progress").removeAttribute("value");
    $("progress").max = 1;
    delete $("progress").dataset.job;
    setStatus(`Submitting ${TASK_TITLES[job.task]}…`);
  },
  accepted(job) {
    $("progress").dataset.job = job.id;
    setAppState("queued");
    if (!job.stopRequested) setStatus("Queued…");
  },
  event: onEvent,
  async done(job, result) {
    $("progress").max = 1;
    $("progress").value = 1;
    await showResults(result);
    setAppState("done"); // after the pictures are in place
    setLastSeed(result.seed);
    const warnings = result.warnings?.length ? ` · ${result.warnings.join("; ")}` : "";
    setStatus(`Done in ${result.seconds.toFixed(2)} s · seed ${result.seed}${warnings}`);
    await remember(job, result);
  },
  ended(job, final) {
    setAppState(final.event);
    if (final.event === "cancelled") {
      setStatus(runner.pending ? "Superseded by a newer request." : "Cancelled.");
    } else if (final.event === "expired") {
      setStatus("Expired.");
      showError({ message: final.error?.message ||
        "the job's deadline passed while it was queued" });
    } else {
      setStatus("Failed.");
      showError(final.error || { message: "the job failed" });
    }
  },
  error(err) {
    setAppState("failed");
    setStatus("Failed.");
    showError(err);
  },
  settled() {
    hidePreview();
    setBusy(false);
  },
  counters(r) {
    $("app").dataset.pending = r.pending ? "1" : "0";
    $("app").dataset.superseded = String(r.superseded);
  },
});

function setBusy(busy) {
  $("generate").disabled = !state.catalog || (busy && !$("realtime").checked);
  $("cancel").disabled = !busy;
  $("stage").classList.toggle("busy", busy);
}

// The Generate button, Ctrl/Cmd+Enter and real-time changes all come here.
function requestGeneration() {
  if (!state.catalog) return;
  let job;
  try {
    job = buildJob();
  } catch (err) {
    showError(err);
    return;
  }
  clearError();
  runner.request(job);
}

$("cancel").addEventListener("click", () => runner.cancel());

function onEvent(job, event) {
  const progress = $("progress");
  switch (event.event) {
    case "state":
    case "started":
      if (event.state === "running" || event.event === "started") {
        setAppState("running");
        if (!job.stopRequested) setStatus("Running…");
      }
      if (event.total) {
        progress.max = event.total;
        progress.value = event.step;
      }
      break;
    case "progress":
      setAppState("running");
      progress.max = event.total;
      progress.value = event.step;
      if (!job.stopRequested) setStatus(`Step ${event.step} of ${event.total}`);
      break;
    case "preview":
      showPreview(event);
      break;
    default:
      break;
  }
}

function showPreview(event) {
  const img = $("preview");
  img.src = `data:${event.media_type || "image/png"};base64,${event.image}`;
  img.dataset.count = String(Number(img.dataset.count || 0) + 1);
  img.dataset.step = String(event.step);
  $("preview-caption").textContent = `step ${event.step}`;
  $("preview-frame").hidden = false;
  $("stage-empty").hidden = true;
}

function hidePreview() {
  $("preview-frame").hidden = true;
  $("stage-empty").hidden = $("results").children.length > 0;
}

// -- results ----------------------------------------------------------------------------------

// The new pictures replace the old ones only once decoded, so the stage never flashes empty
// (in real-time mode it changes several times a second).
async function showResults(result, { fromHistory = false } = {}) {
  const urls = [];
  const nodes = result.images.map((image, i) => {
    const node = document.importNode($("result-template").content.firstElementChild, true);
    const blob = b64ToBlob(image.b64, image.media_type);
    const url = URL.createObjectURL(blob);
    urls.push(url);
    const video = image.media_type.startsWith("video/");
    const media = document.createElement(video ? "video" : "img");
    if (video) Object.assign(media, { autoplay: true, loop: true, muted: true, controls: true,
      playsInline: true });
    media.src = url;
    media.dataset.testid = "result";
    media.dataset.seed = String(result.seed);
    media.dataset.mediaType = image.media_type;
    media.alt = `result ${i + 1}: ${result.params?.request?.prompt || ""}`;
    media.addEventListener("load", () => {
      media.classList.toggle("pixelated", media.naturalWidth < 256);
    });
    node.querySelector(".media").append(media);
    const request = result.params?.request || {};
    const width = result.params?.width ?? request.width ?? "?";
    const height = result.params?.height ?? request.height ?? "?";
    const size = `${width} × ${height}`;
    node.querySelector(".meta").textContent =
      `seed ${result.seed} · ${size}${fromHistory ? "" : ` · ${result.seconds.toFixed(2)} s`}`;
    const ext = { "image/png": "png", "image/gif": "gif", "video/mp4": "mp4" }[image.media_type]
      || "bin";
    const link = node.querySelector(".download");
    link.href = url;
    link.download = `fewstep-${result.seed}${result.images.length > 1 ? `-${i + 1}` : ""}.${ext}`;
    link.setAttribute("aria-label",
      `Download result ${i + 1} (${ext.toUpperCase()} with its parameters)`);
    const use = node.querySelector(".use-input");
    if (image.media_type === "image/png") {
      use.addEventListener("click", () => {
        const target = IMAGE_TASKS.has(state.task) ? state.task : "img2img";
        if (!unsupported(target)) selectTask(target);
        setInputImage({ b64: image.b64, url: URL.createObjectURL(blob), width: 0, height: 0,
          name: `result seed ${result.seed}`, ...sizeOf(media) });
        offerImageSettings(blob);
      });
    } else {
      use.remove();
    }
    return node;
  });
  await Promise.all(nodes.map((node) => node.querySelector("img")?.decode().catch(() => {})));
  for (const url of state.resultUrls) URL.revokeObjectURL(url);
  state.resultUrls = urls;
  const results = $("results");
  results.classList.toggle("single", result.images.length === 1);
  results.replaceChildren(...nodes);
  $("stage-empty").hidden = true;
}

function sizeOf(img) {
  return { width: img.naturalWidth, height: img.naturalHeight };
}

// -- history ----------------------------------------------------------------------------------

async function remember(job, result) {
  try {
    await history.add({
      created: Date.now(), task: job.task, seed: result.seed, seconds: result.seconds,
      settings: { ...job.settings, seed: String(result.seed) },
      params: result.params, images: result.images,
    });
  } catch {
    // storage full or unavailable: the result is still shown
  }
  await renderHistory();
}

async function renderHistory() {
  let entries = [];
  try {
    entries = await history.list();
  } catch {
    entries = [];
  }
  const list = $("history");
  list.replaceChildren(...entries.map((entry) => {
    const node = document.importNode($("history-template").content.firstElementChild, true);
    node.dataset.id = String(entry.id);
    const first = entry.images[0];
    const thumb = node.querySelector(".thumb");
    thumb.src = `data:${first.media_type};base64,${first.b64}`;
    thumb.alt = `result of ${entry.settings.prompt || "an empty prompt"}`;
    thumb.tabIndex = 0;
    thumb.title = "Show these results";
    const show = () => showResults({ images: entry.images, seed: entry.seed,
      params: entry.params, seconds: entry.seconds }, { fromHistory: true });
    thumb.addEventListener("click", show);
    thumb.addEventListener("keydown", (e) => { if (e.key === "Enter") show(); });
    node.querySelector(".history-prompt").textContent = entry.settings.prompt || "(empty prompt)";
    const s = entry.settings;
    const meta = [TASK_TITLES[entry.task], `${s.steps} steps`, `guidance ${s.guidance}`,
      `seed ${entry.seed}`, `${s.width}×${s.height}`,
      ...(s.loras || []).map((l) => `${l.name}:${l.weight}`), ago(entry.created)];
    node.querySelector(".history-meta").textContent = meta.join(" · ");
    node.querySelector(".use-settings").addEventListener("click",
      () => applySettings(entry.settings, "Settings restored from the history"));
    node.querySelector(".history-delete").addEventListener("click", async () => {
      await history.remove(entry.id);
      renderHistory();
    });
    return node;
  }));
  $("history-clear").disabled = entries.length === 0;
}

$("history-clear").addEventListener("click", async () => {
  await history.clear();
  renderHistory();
});

// Fills the form from settings (the history's, or a PNG's: see pnginfo.js), then says so in the
// status with `what`, followed by anything that could not be restored.
function applySettings(s, what) {
  const notes = [];
  if (s.task && s.task !== state.task) {
    const reason = unsupported(s.task);
    if (reason) notes.push(`${TASK_TITLES[s.task] || s.task}: ${reason}`);
    else selectTask(s.task);
  }
  const model = state.catalog?.data[0].id;
  if (s.model && model && s.model !== model) {
    notes.push(`made with the model ${s.model}, not ${model}`);
  }
  const loras = [];
  for (const lora of s.loras || []) {
    const name = catalogName(lora.name, state.loraNames);
    if (name) loras.push({ name, weight: lora.weight });
    else notes.push(`LoRA ${lora.name} is not in this server's catalogue`);
  }
  s = { ...s, loras };
  const components = [["controlnet", "controlnet", "ControlNet"],
    ["adapter", "adapter", "T2I-Adapter"], ["motion-adapter", "motion_adapter", "motion adapter"]];
  for (const [id, field, title] of components) {
    if (!s[field]) continue;
    const name = catalogName(s[field], [...$(id).options].map((o) => o.value));
    if (name) s[field] = name;
    else notes.push(`${title} ${s[field]} is not in this server's catalogue`);
  }
  $("prompt").value = s.prompt ?? "";
  $("negative").value = s.negative ?? "";
  $("seed").value = s.seed ?? "";
  for (const field of Object.keys(NUMBERS)) {
    if (s[field] !== undefined && s[field] !== "") setNumber(field, s[field]);
  }
  $("width").dataset.touched = "1";
  for (const [id, name] of [["controlnet", s.controlnet], ["adapter", s.adapter],
    ["motion-adapter", s.motion_adapter]]) {
    if (name && [...$(id).options].some((o) => o.value === name)) $(id).value = name;
  }
  $("canny").checked = s.canny ?? true;
  const chosen = new Map((s.loras || []).map((l) => [l.name, l.weight]));
  for (const row of document.querySelectorAll(".lora-row")) {
    const on = chosen.has(row.dataset.lora);
    row.querySelector(".lora-on").checked = on;
    if (on) {
      row.querySelector(".lora-weight").value = chosen.get(row.dataset.lora);
      row.querySelector(".lora-range").value = chosen.get(row.dataset.lora);
    }
    syncLoraRow(row);
  }
  syncSizePreset();
  syncNegativeHint();
  saveTaskValues(state.task);
  clearError();
  if (IMAGE_TASKS.has(state.task) && !state.image) {
    notes.push(state.task === "inpaint" ? "the input image and mask are not kept: add them"
      : "the input image is not kept: add one");
  }
  setStatus([what, ...notes].join(" · ") + ".");
  scheduleCanny(0);
  $("prompt").focus();
}

// The catalogue's name for a reference: the name itself, or a file's or folder's name without
// .safetensors (records of the command line keep paths; infotext keeps those names).
function catalogName(ref, names) {
  if (names.includes(ref)) return ref;
  const stem = String(ref).replace(/[/\\]+$/, "").split(/[/\\]/).pop()
    .replace(/\.safetensors$/, "");
  return names.includes(stem) ? stem : null;
}

// -- settings from a PNG --------------------------------------------------------------------------

async function readSettingsFile(file) {
  clearError();
  let settings = null;
  try {
    settings = await pngSettings(file);
  } catch {
    settings = null;
  }
  const name = file.name || "the file";
  if (!settings) {
    const what = file.type === "image/png"
      ? `${name} carries no settings (neither a fewstep record nor A1111 parameters)`
      : `${name} carries no settings: they are read from PNG files`;
    const hint = IMAGE_TASKS.has(state.task) && file.type.startsWith("image/")
      ? "; to use it as the input image, drop it on the image box" : "";
    showError(new FieldError(`settings: ${what}${hint}`, "settings"));
    return;
  }
  applySettings(settings, `Settings read from ${name}`);
}

$("settings-button").addEventListener("click", () => $("settings-file").click());
$("settings-file").addEventListener("change", () => {
  const file = $("settings-file").files[0];
  if (file) readSettingsFile(file);
  $("settings-file").value = ""; // the same file again is read again
});

// A file dropped anywhere but on the input image's box: its settings fill the form.
let dropTimer = null;
document.addEventListener("dragover", (event) => {
  if (!event.dataTransfer?.types?.includes("Files")) return;
  event.preventDefault(); // else the browser would leave the page to show the file
  if (event.target.closest?.("#drop-zone") && visible($("drop-zone"))) return;
  document.body.classList.add("dropping-settings");
  clearTimeout(dropTimer); // dragover repeats while the file is held over the page
  dropTimer = setTimeout(() => document.body.classList.remove("dropping-settings"), 200);
});
document.addEventListener("drop", (event) => {
  document.body.classList.remove("dropping-settings");
  if (event.defaultPrevented || !event.dataTransfer?.files?.length) return; // the image box's
  event.preventDefault();
  readSettingsFile(event.dataTransfer.files[0]);
});

// -- real-time mode, keyboard, leaving --------------------------------------------------------

function onInputChanged() {
  if (!$("realtime").checked) return;
  clearTimeout(state.realtimeTimer);
  state.realtimeTimer = setTimeout(requestGeneration, REALTIME_DEBOUNCE_MS);
}

$("controls").addEventListener("input", (event) => {
  if (event.target.closest(".lora-row") || event.target.closest("#canny-low, #canny-high")) {
    onInputChanged();
    return;
  }
  if (event.target.matches("textarea, input[type=number], input[type=range]")) onInputChanged();
  if (event.target.id && PER_TASK.some((name) => NUMBERS[name] === event.target.id ||
      `${NUMBERS[name]}-range` === event.target.id)) {
    saveTaskValues(state.task);
  }
  if (event.target.closest(".invalid")) clearError();
});
$("controls").addEventListener("change", (event) => {
  if (event.target.matches("select")) onInputChanged();
});
$("controls").addEventListener("submit", (event) => event.preventDefault());

$("realtime").addEventListener("change", () => {
  document.body.classList.toggle("realtime", $("realtime").checked);
  setBusy(runner.busy);
  if ($("realtime").checked) onInputChanged();
});

$("generate").addEventListener("click", () => requestGeneration());
document.addEventListener("keydown", (event) => {
  if ((event.ctrlKey || event.metaKey) && event.key === "Enter") {
    event.preventDefault();
    if ($("key-dialog").open) return;
    if (runner.busy && !$("realtime").checked) return;
    requestGeneration();
  }
});

// Closing the tab stops its job, so nobody's queue fills with pictures no one will see.
window.addEventListener("pagehide", () => {
  const id = runner.current?.id;
  if (id) runner.cancelOnServer(id, { keepalive: true });
});

// -- start ------------------------------------------------------------------------------------

async function start() {
  await history.open();
  renderHistory();
  selectTask("txt2img");
  await loadCatalog();
}

start();
