"""Plain descriptions of pipeline calls: what a task asks the engine to run.

A task turns its request into a `PipelineCall` (which pipeline, its arguments, the batch argument,
the LoRA stack, the output kind) from a `ModelView`, the little a task may know about the loaded
model. The engine runs calls, and may merge compatible ones into one batched call. Nothing here
imports torch or the engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from .config import Settings
from .errors import ModelError
from .families import Family


@dataclass(frozen=True)
class ModelView:
    """What a task may read about the loaded model: no modules, no pipelines.

    `adapter_geometry(ref)` gives a T2I-Adapter's (total downscale factor, input channels),
    from its config (before loading) or the loaded adapter."""

    family: Family
    native_size: int
    inpaint_only: bool
    settings: Settings
    adapter_geometry: Callable[[str], tuple[int, int]]
    model_ref: str = "the model"  # for messages


def plan_call(request, model: ModelView) -> PipelineCall:
    """Check `request` against the limits and the model and describe its pipeline call, with a
    concrete seed (drawn when none was given). Raises a FewstepError naming the field; runs
    nothing. The engine plans with its loaded model's view, the builder with a blueprint's."""
    request.check_limits(model.settings)
    request = request.with_seed()
    if model.inpaint_only and request.task != "inpaint":
        raise ModelError(
            f"{model.model_ref!r} is an inpainting model (9-channel UNet): it runs the inpaint "
            f"task only, not {request.task!r}", field="model")
    model.family.check_task(request.task)  # a task the family has
    return request.describe(model)


@dataclass(frozen=True)
class PipelineCall:
    """One call of a diffusers pipeline, fully decided: the engine adds only the prompt
    embeddings, the seeded generators, the step callback and the LoRA weights."""

    task: str  # which pipeline: `Family.pipeline_class(task)`
    prompt: str
    negative_prompt: str | None
    steps: int
    guidance: float
    seed: int
    count: int  # images (videos for animations) for this prompt
    width: int
    height: int
    components: tuple[tuple[str, str], ...] = ()  # (pipeline argument, reference)
    arguments: dict[str, Any] = field(default_factory=dict)  # the task's own arguments
    batch_arg: str = "num_images_per_prompt"
    loras: tuple[tuple[str, float], ...] = ()  # (reference, weight)
    output: str = "images"  # "images" (N, H, W, 3) or "frames" (N, F, H, W, 3)
    batched: tuple[str, ...] = ()  # arguments given per prompt when calls are merged
    record: dict[str, Any] = field(default_factory=dict)  # the request, for the result
    inputs: dict[str, str] = field(default_factory=dict)  # input image digests, by field
    warnings: tuple[str, ...] = ()

    def merge_key(self) -> tuple | None:
        """Calls with equal keys can run as one pipeline call (each with its own prompt and
        generator); None when this one cannot be merged. One image per call only: a request's
        several images come from one generator, which a list of generators cannot replay."""
        if self.count != 1:
            return None
        shared = []
        for name, value in sorted(self.arguments.items()):
            if name in self.batched:
                continue
            if not isinstance(value, (str, int, float, bool, type(None))):
                return None  # images and other objects are compared by identity: not merged
            shared.append((name, value))
        return (self.task, self.components, self.steps, self.guidance, self.width, self.height,
                self.loras, self.batch_arg, self.output, self.negative_prompt is None,
                tuple(shared))
