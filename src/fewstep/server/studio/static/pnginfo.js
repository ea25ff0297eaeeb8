// Settings carried by a PNG, read in the browser (nothing is sent): the `fewstep` text chunk, the
// whole record of an output of this service (JSON), or else AUTOMATIC1111-style infotext (the
// `parameters` chunk), which fewstep writes too and other tools read and write.

const SIGNATURE = [137, 80, 78, 71, 13, 10, 26, 10];
const TEXT_CHUNKS = new Set(["tEXt", "zTXt", "iTXt"]);
const MAX_TEXT_BYTES = 1 << 20; // settings are a few kB: a larger text chunk is something else
const RECORD_KEY = "fewstep";
const INFOTEXT_KEY = "parameters";

// The text chunks of a PNG as a Map keyword -> text, or null when the bytes are not a PNG.
export async function pngTexts(blob) {
  const bytes = new Uint8Array(await blob.arrayBuffer());
  if (bytes.length < 8 || SIGNATURE.some((b, i) => bytes[i] !== b)) return null;
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const texts = new Map();
  for (let at = 8; at + 12 <= bytes.length;) {
    const length = view.getUint32(at);
    const type = String.fromCharCode(...bytes.subarray(at + 4, at + 8));
    const start = at + 8;
    const end = start + length;
    if (type === "IEND" || end + 4 > bytes.length) break;
    if (TEXT_CHUNKS.has(type) && length <= MAX_TEXT_BYTES) {
      const entry = await readTextChunk(type, bytes.subarray(start, end));
      if (entry && !texts.has(entry[0])) texts.set(entry[0], entry[1]);
    }
    at = end + 4; // past the CRC
  }
  return texts;
}

async function readTextChunk(type, data) {
  const nul = data.indexOf(0);
  if (nul < 1) return null;
  const keyword = latin1(data.subarray(0, nul));
  let rest = data.subarray(nul + 1);
  try {
    if (type === "tEXt") return [keyword, latin1(rest)];
    if (type === "zTXt") return [keyword, latin1(await inflate(rest.subarray(1)))];
    // iTXt: compression flag, method, language tag, translated keyword, then UTF-8 text
    const compressed = rest[0] === 1;
    rest = rest.subarray(2);
    for (let skip = 0; skip < 2; skip += 1) {
      const end = rest.indexOf(0);
      if (end < 0) return null;
      rest = rest.subarray(end + 1);
    }
    return [keyword, new TextDecoder("utf-8", { fatal: true })
      .decode(compressed ? await inflate(rest) : rest)];
  } catch {
    return null; // damaged or unreadable: as if absent
  }
}

function latin1(bytes) {
  let text = "";
  for (let i = 0; i < bytes.length; i += 8192) {
    text += String.fromCharCode(...bytes.subarray(i, i + 8192));
  }
  return text;
}

// zlib data, inflated up to MAX_TEXT_BYTES (a small chunk may inflate to gigabytes).
async function inflate(bytes) {
  const reader = new Blob([bytes]).stream()
    .pipeThrough(new DecompressionStream("deflate")).getReader();
  const parts = [];
  let size = 0;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    size += value.length;
    if (size > MAX_TEXT_BYTES) {
      reader.cancel().catch(() => {});
      throw new Error("text chunk too large");
    }
    parts.push(value);
  }
  const out = new Uint8Array(size);
  let at = 0;
  for (const part of parts) {
    out.set(part, at);
    at += part.length;
  }
  return out;
}

// The settings a PNG carries, in the form's terms, or null when it carries none:
// {source: "record" | "infotext", model, task?, prompt, negative, seed, loras: [{name, weight}],
//  steps, guidance, width, height, ... (numbers by their request names), controlnet, ...}.
export async function pngSettings(blob) {
  const texts = await pngTexts(blob);
  if (texts === null) return null;
  if (texts.has(RECORD_KEY)) {
    try {
      const settings = fromRecord(JSON.parse(texts.get(RECORD_KEY)));
      if (settings) return settings;
    } catch {
      // not JSON: fall back to the infotext
    }
  }
  return texts.has(INFOTEXT_KEY) ? fromInfotext(texts.get(INFOTEXT_KEY)) : null;
}

const NUMBER_FIELDS = ["steps", "guidance", "strength", "width", "height", "num_images",
  "conditioning_scale", "conditioning_factor", "num_frames", "fps", "canny_low", "canny_high"];

function fromRecord(record) {
  const request = record?.request;
  if (!request || typeof request.prompt !== "string") return null;
  const settings = {
    source: "record",
    model: typeof record.model === "string" ? record.model : null,
    task: request.task,
    prompt: request.prompt,
    negative: request.negative_prompt || "",
    seed: Number.isInteger(request.seed) ? String(request.seed) : "",
    loras: (request.loras || []).map((lora) => ({ name: String(lora.ref),
      weight: Number(lora.weight) })),
  };
  for (const field of NUMBER_FIELDS) {
    if (typeof request[field] === "number") settings[field] = request[field];
  }
  // a size taken from the input image is only in the record's outcome
  for (const field of ["width", "height"]) {
    if (settings[field] === undefined && typeof record[field] === "number") {
      settings[field] = record[field];
    }
  }
  for (const field of ["controlnet", "adapter", "motion_adapter"]) {
    if (typeof request[field] === "string") settings[field] = request[field];
  }
  if (typeof request.canny === "boolean") settings.canny = request.canny;
  return settings;
}

// A1111's infotext: the prompt (with <lora:name:weight> tags), an optional "Negative prompt:"
// part, and a last line of "Key: value" pairs (values with commas are JSON-quoted).
const PARAM = /\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)/g;
const LORA_TAG = /\s*<lora:([^:>]+)(?::([^:>]*))?(?::[^>]*)?>/g;

export function fromInfotext(text) {
  const lines = text.trim().split("\n");
  let last = lines.pop() ?? "";
  if ([...last.matchAll(PARAM)].length < 3) { // no parameters line: all prompt
    lines.push(last);
    last = "";
  }
  const prompt = [];
  const negative = [];
  for (const line of lines) {
    if (negative.length || line.startsWith("Negative prompt:")) {
      negative.push(negative.length ? line : line.slice("Negative prompt:".length).trim());
    } else {
      prompt.push(line);
    }
  }
  const loras = [];
  const promptText = prompt.join("\n").replace(LORA_TAG, (_, name, weight) => {
    const value = weight === undefined || weight === "" ? 1 : Number(weight);
    if (Number.isFinite(value)) loras.push({ name, weight: value });
    return "";
  }).trim();
  const params = new Map();
  for (const [, key, raw] of last.matchAll(PARAM)) {
    let value = raw.trim();
    if (value.startsWith('"')) {
      try {
        value = JSON.parse(value);
      } catch {
        // kept as written
      }
    }
    params.set(key.trim(), value);
  }
  if (!promptText && !params.size) return null;
  const settings = { source: "infotext", model: params.get("Model") || null, prompt: promptText,
    negative: negative.join("\n"), seed: "", loras };
  const number = (key) => {
    const value = Number(params.get(key));
    return params.has(key) && params.get(key) !== "" && Number.isFinite(value) ? value : undefined;
  };
  const seed = number("Seed");
  if (Number.isInteger(seed) && seed >= 0) settings.seed = String(seed);
  for (const [key, field] of [["Steps", "steps"], ["CFG scale", "guidance"],
    ["Denoising strength", "strength"], ["Batch size", "num_images"]]) {
    if (number(key) !== undefined) settings[field] = number(key);
  }
  const size = /^(\d+)x(\d+)$/.exec(params.get("Size") || "");
  if (size) {
    settings.width = Number(size[1]);
    settings.height = Number(size[2]);
  }
  return settings;
}
