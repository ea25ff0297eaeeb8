"""The benchmark: the reference recipe against fewstep's speed presets on the same weights.

    python -m fewstep.bench --family sd15 --resolution 256 --steps 4 --batch 1,2 --device cpu

One concern per module:

* `models`: the real SD1.5 / SDXL / SSD-1B architectures with random weights and their LCM-LoRA,
  saved in the real formats (the tiny test models for a smoke run),
* `modes`: the recipe and the engine presets `default`, `auto`, `fastest`, each loaded fresh,
* `measure`: latency, throughput, peak memory, the stages of a call, host syncs, graphs compiled
  during the timed calls,
* `coldstart`: process start to first image in subprocesses (empty and warm compile cache),
* `lora_switch`: LoRA changes on a compiled UNet,
* `report`: the JSON, the markdown summary and the chart,
* `cli`: the options (`fewstep bench` and `python -m fewstep.bench`).

See benchmarks/README.md for what each column means and the measured results."""

from .cli import main

__all__ = ["main"]
