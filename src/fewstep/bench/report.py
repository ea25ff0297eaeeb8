"""The benchmark's outputs: the JSON (everything measured), a markdown summary and a chart."""

from __future__ import annotations

import json
import os
import platform
import re
from pathlib import Path
from typing import Any

STAGES = ("text_encode", "unet_steps", "vae_decode")


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    model = _cpu_model() or platform.processor() or platform.machine()
    return f"{model} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def device_slug(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device)).lower()
        return re.sub(r"[^a-z0-9]+", "-", name).strip("-")
    return f"cpu-{os.cpu_count()}core"


def ratios(results: dict[str, dict]) -> dict[str, dict[str, Any]]:
    """Each engine mode against the recipe: speed-ups (recipe time / mode time) for the p50 and
    each stage, throughput and memory as mode / recipe."""
    base = results["recipe"]
    out = {}
    for mode, r in results.items():
        if mode == "recipe":
            continue
        stages = {}
        for stage in STAGES:
            a, b = base["breakdown"].get(f"{stage}_ms"), r["breakdown"].get(f"{stage}_ms")
            stages[stage] = round(a / b, 3) if a and b else None
        out[mode] = {
            "latency_speedup": round(base["latency_ms_p50"] / r["latency_ms_p50"], 3),
            "throughput_ratio": round(r["images_per_s"] / base["images_per_s"], 3),
            "throughput_ratio_by_batch": {
                b: round(v / base["images_per_s_by_batch"][b], 3)
                for b, v in r["images_per_s_by_batch"].items()},
            "memory_ratio": round(r["peak_memory_mb"] / base["peak_memory_mb"], 3),
            "stage_speedup": stages,
        }
    return out


def _dash(value) -> str:
    return "—" if value is None else str(value)


def markdown(data: dict) -> str:
    cfg = data["config"]
    results = data["results"]
    modes = list(results)
    batches = [str(b) for b in cfg["batch"]]
    lines = [
        f"# {cfg['family']} {cfg['resolution']}x{cfg['resolution']}, {cfg['steps']} steps, "
        f"guidance 1.0 — {data['device']}",
        "",
        f"torch {data['versions']['torch']}, diffusers {data['versions']['diffusers']}, "
        f"dtype {cfg['dtype']}, random weights"
        f"{' (tiny test models)' if cfg['tiny'] else ' of the real architecture'}; "
        + (f"{cfg['repeats']} timed calls at batch 1 after a warm-up of every timed shape, "
           f"{cfg['throughput_repeats']} per throughput batch" if modes else "cold starts only")
        + f". Device: `{cfg['device']}`.",
        "",
    ]
    if modes:
        lines += _mode_tables(data, modes, batches)
    if data.get("cold_start"):
        lines += ["", "Cold start, process start to first image (s):", "",
                  "| mode | compile cache | total | import | load (with compiling) | first image "
                  "| peak memory (MB) |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for mode, info in data["cold_start"].items():
            runs = [("empty", info["cold"]), ("warm", info["warm"])] if "cold" in info \
                else [("—", info)]
            for cache, run in runs:
                if "error" in run:
                    lines.append(f"| {mode} | {cache} | failed: "
                                 f"{run['error'].strip().splitlines()[-1][:120]} | | | | |")
                else:
                    lines.append(f"| {mode} | {cache} | {run['process_start_to_first_image_s']}"
                                 f" | {run['import_s']} | {run['load_s']} | "
                                 f"{run['first_image_s']} | {run.get('peak_rss_mb') or '—'} |")
    if data.get("one_shot"):
        lines += _one_shot_table(data["one_shot"])
    # images decoded per timed call (the most any one decoded) against the batch it returned;
    # none seen is no waste (a replayed CUDA graph calls no decode method)
    wasted = {m: {b: n for b, n in r.get("images_decoded_by_batch", {}).items() if n > int(b)}
              for m, r in data["results"].items()}
    for mode, batches_off in wasted.items():
        for batch, n in batches_off.items():
            lines += ["", f"Note: {mode} decoded {n} images in a batch-{batch} call: its "
                      f"images/s b{batch} counts only the {batch} it returned."]
    for mode, r in data["results"].items():
        if r.get("graph_loop_calls"):
            lines += ["", f"Note: {r['graph_loop_calls']} of {mode}'s measured calls replayed "
                      "the whole-loop CUDA graph: its stage split shows the text encoder alone "
                      "(the steps and the decode fall under other)."]
    if data.get("agreement"):
        lines += ["", "Largest pixel difference (0..1) of the first image against the recipe's: "
                  + ", ".join(f"{k} {v}" for k, v in data["agreement"].items()) + "."]
    for note in data.get("notes", []):
        lines += ["", note]
    return "\n".join(lines) + "\n"


def _mode_tables(data: dict, modes: list[str], batches: list[str]) -> list[str]:
    results = data["results"]
    lines = [
        "| mode | p50 (ms) | p90 (ms) | " + " | ".join(f"images/s b{b}" for b in batches)
        + " | peak memory (MB) | load (s) | speed-up vs recipe (p50) | throughput vs recipe "
        "| machine load (1 min, before/after) |",
        "|---|" + "---:|" * (6 + len(batches)) + "---|",
    ]
    for mode in modes:
        r = results[mode]
        ratio = data["ratios"].get(mode, {"latency_speedup": 1.0, "throughput_ratio": 1.0})
        lines.append(
            f"| {mode} | {r['latency_ms_p50']} | {r['latency_ms_p90']} | "
            + " | ".join(str(r["images_per_s_by_batch"][b]) for b in batches)
            + f" | {r['peak_memory_mb']} | {r['load_s']} | {ratio['latency_speedup']}x | "
            f"{ratio['throughput_ratio']}x | "
            f"{' / '.join(str(v) for v in r.get('load_average_1min', [])) or '—'} |")
    lines += ["", "Where the time goes (median of batch-1 calls, ms; speed-up against the "
              "recipe's stage in brackets):", "",
              "| mode | text encode | UNet steps (all) | per step | VAE decode | other | total |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for mode in modes:
        b = results[mode]["breakdown"]
        stage = data["ratios"].get(mode, {}).get("stage_speedup", {})

        def cell(key):
            value = b.get(f"{key}_ms")
            return f"{value} ({stage[key]}x)" if stage.get(key) else _dash(value)

        lines.append(f"| {mode} | {cell('text_encode')} | {cell('unet_steps')} | "
                     f"{_dash(b.get('unet_step_ms'))} | {cell('vae_decode')} | "
                     f"{_dash(b.get('other_ms'))} | {_dash(b.get('total_ms'))} |")
    lines += ["", "Host syncs and compiles:", "",
              "| mode | host syncs per call (CUDA) | cudaStreamSynchronize per call "
              "(profiler) | scalar reads in the loop | recompiles during timed calls | UNet "
              "batch per image | compiled ahead | compile at start-up (s) | first call after "
              "load (ms) |", "|---|---:|---:|---:|---:|---:|---|---:|---:|"]
    for mode in modes:
        r = results[mode]
        profiled = (r.get("profiler") or {}).get("cudaStreamSynchronize")
        lines.append(f"| {mode} | {_dash(r['host_syncs_per_call'])} | {_dash(profiled)} | "
                     f"{_dash(r['scalar_reads_in_loop'])} | "
                     f"{r['recompiles_during_timed_calls']} | {_dash(r['unet_batch_per_image'])} "
                     f"| {', '.join(r['compiled_shapes']) or '—'} | "
                     f"{_dash(r['compile_warmup_s'])} | {r['first_call_ms']} |")
    return lines


def chart(data: dict, path: Path) -> None:
    results = data["results"]
    labels = list(results)
    big = str(max(data["config"]["batch"]))
    lat = [results[m]["latency_ms_p50"] for m in labels]
    ips = [results[m]["images_per_s_by_batch"][big] for m in labels]
    title = (f"{data['config']['family']} {data['config']['resolution']}px "
             f"{data['config']['steps']} steps — {data['device']}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _pil_chart(labels, lat, ips, title, path)
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = ["#888888", "#4c72b0", "#55a868", "#dd8452"][:len(labels)]
    axes[0].bar(labels, lat, color=colors)
    axes[0].set_ylabel("batch-1 latency p50 (ms), lower is better")
    axes[1].bar(labels, ips, color=colors)
    axes[1].set_ylabel(f"images/s at batch {big}, higher is better")
    for ax, values in ((axes[0], lat), (axes[1], ips)):
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:g}", ha="center", va="bottom")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _pil_chart(labels, lat, ips, title, path: Path) -> None:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (900, 360), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 8), title.replace("—", "-"), fill="black")  # PIL's default font: ASCII
    for panel, (name, values) in enumerate((("latency p50 ms (lower is better)", lat),
                                            ("images/s (higher is better)", ips))):
        x0 = 20 + panel * 450
        draw.text((x0, 30), name, fill="black")
        top = max(values) or 1
        for i, (label, v) in enumerate(zip(labels, values)):
            h = int(250 * v / top)
            x = x0 + 10 + i * 105
            draw.rectangle([x, 320 - h, x + 80, 320], fill=(76, 114, 176))
            draw.text((x, 322), label, fill="black")
            draw.text((x, 305 - h), f"{v:g}", fill="black")
    img.save(path)


def write(data: dict, out: Path, name: str, json_path: Path | None = None) -> Path:
    """Write `<name>.json`, `.md` and `.png` in `out` (the JSON at `json_path` if given)."""
    out.mkdir(parents=True, exist_ok=True)
    json_path = json_path or out / f"{name}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(data, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown(data))
    if data["results"]:
        chart(data, out / f"{name}.png")
    return json_path


def _one_shot_table(runs: dict) -> list[str]:
    """One-shot commands: process start to file written, against the recipe as a script."""
    recipe = runs.get("recipe", {}).get("process_start_to_file_s")
    lines = ["", "One-shot command, process start to output file written (s): the recipe as a "
             "script, `fewstep txt2img` with an empty cache (it prepares the fast path after "
             "writing its file: the process ends later) and with the cache that left:", "",
             "| command | cache | file written | vs recipe | process ended | peak memory (MB) "
             "| runs on |",
             "|---|---|---:|---:|---:|---:|---|"]
    for name, info in runs.items():
        pairs = [("—", info)] if name == "recipe" else [("empty", info["cold"]),
                                                         ("warm", info["warm"])]
        for cache, run in pairs:
            label = "recipe script" if name == "recipe" else f"fewstep --speed {name}"
            if "error" in run:
                lines.append(f"| {label} | {cache} | failed: "
                             f"{run['error'].strip().splitlines()[-1][:100]} | | | | |")
                continue
            seconds = run["process_start_to_file_s"]
            ratio = f"{recipe / seconds:.2f}x" if recipe and name != "recipe" else "1.0x"
            said = "; ".join(run.get("said") or []).replace("|", "/")
            lines.append(f"| {label} | {cache} | {seconds} | {ratio} | {run['process_end_s']} "
                         f"| {run.get('peak_rss_mb', '—')} | {said} |")
    return lines
