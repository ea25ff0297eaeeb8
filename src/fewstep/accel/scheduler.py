"""A sync-free LCM scheduler: the same arithmetic as diffusers' `LCMScheduler.step`, with every
per-step scalar prepared before the loop, so a denoising loop reads nothing back from the device.

What the stock scheduler does per step, and what this one does instead:

* the step index comes from `(timesteps == t).nonzero().item()` -> a Python counter (the begin
  index is set with the timesteps; img2img pipelines still move it with `set_begin_index`);
* `alphas_cumprod[t]` with a device timestep (a read-back to index) and the `prev_timestep >= 0`
  branch -> tables indexed by the Python counter, built once per schedule;
* the boundary scalings computed from the device timestep -> the same float32 arithmetic, done
  once for the whole schedule on the device;
* noise drawn per step on the CPU generator, then copied -> all the noise the schedule needs,
  drawn at the first step from the same generator(s) in the same order and dtype (so the pixels
  do not change), copied to the device once (from pinned memory on CUDA, without blocking).

Every value keeps the device and dtype the stock scheduler gives it, so results are bitwise
equal to `LCMScheduler` (tests compare step by step)."""

from __future__ import annotations

import torch
from diffusers import LCMScheduler
from diffusers.schedulers.scheduling_lcm import LCMSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor


class StaticLCMScheduler(LCMScheduler):
    """`LCMScheduler` without host syncs inside the denoising loop."""

    def set_timesteps(self, num_inference_steps=None, device=None, *args, **kwargs):
        super().set_timesteps(num_inference_steps, None, *args, **kwargs)  # on the CPU first
        self._host_timesteps = [int(t) for t in self.timesteps.tolist()]  # read without a sync
        if device is not None:
            self.timesteps = self.timesteps.to(device)
        self.set_begin_index(0)  # txt2img pipelines never set it; img2img ones set it again
        self._tables = None
        self._noise = None

    def tables(self, device) -> dict:
        """Per-index scalars for the whole schedule (set_timesteps first): the alpha tables as
        CPU scalars, as the stock step reads `alphas_cumprod`, and the boundary scalings on
        `device`, as the stock step computes them from the device timestep."""
        timesteps = self._host_timesteps
        alphas = self.alphas_cumprod  # on the CPU, as the stock step reads it
        alpha_t, alpha_prev = [], []
        for k, t in enumerate(timesteps):
            prev = timesteps[k + 1] if k + 1 < len(timesteps) else t
            alpha_t.append(alphas[t])
            alpha_prev.append(alphas[prev] if prev >= 0 else self.final_alpha_cumprod)
        steps = torch.tensor(timesteps, dtype=torch.long, device=device)
        c_skip, c_out = self.get_scalings_for_boundary_condition_discrete(steps)
        return {
            "alpha_sqrt": [a.sqrt() for a in alpha_t],
            "beta_sqrt": [(1 - a).sqrt() for a in alpha_t],
            "alpha_prev_sqrt": [a.sqrt() for a in alpha_prev],
            "beta_prev_sqrt": [(1 - a).sqrt() for a in alpha_prev],
            "c_skip": c_skip,
            "c_out": c_out,
        }

    def draw_noise(self, shape, dtype, generator, first: int = 0) -> torch.Tensor | None:
        """The noise of every step from index `first` on that adds noise (all but the last),
        stacked on the CPU: the same draws, in the same order, as the stock step makes one per
        step. None when no step adds noise."""
        count = max(0, self.num_inference_steps - 1 - first)
        if count == 0:
            return None
        return torch.stack([randn_tensor(shape, generator=generator,
                                         device=torch.device("cpu"), dtype=dtype)
                            for _ in range(count)])

    def update(self, tables: dict, k: int, model_output: torch.Tensor, sample: torch.Tensor,
               noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Step index `k` of the stock `LCMScheduler.step`, from `tables`, with this step's
        `noise` (unused at the last step): (prev_sample, denoised)."""
        tab = tables
        prediction = self.config.prediction_type
        if prediction == "epsilon":
            predicted = (sample - tab["beta_sqrt"][k] * model_output) / tab["alpha_sqrt"][k]
        elif prediction == "sample":
            predicted = model_output
        elif prediction == "v_prediction":
            predicted = tab["alpha_sqrt"][k] * sample - tab["beta_sqrt"][k] * model_output
        else:
            raise ValueError(f"prediction_type given as {prediction} must be one of `epsilon`, "
                             "`sample` or `v_prediction` for `LCMScheduler`.")
        if self.config.thresholding:
            predicted = self._threshold_sample(predicted)
        elif self.config.clip_sample:
            predicted = predicted.clamp(-self.config.clip_sample_range,
                                        self.config.clip_sample_range)

        denoised = tab["c_out"][k] * predicted + tab["c_skip"][k] * sample
        if k != self.num_inference_steps - 1:
            prev_sample = tab["alpha_prev_sqrt"][k] * denoised + tab["beta_prev_sqrt"][k] * noise
        else:
            prev_sample = denoised
        return prev_sample, denoised

    def _prepare(self, model_output: torch.Tensor, generator) -> None:
        """Per-index tables for the whole schedule and the noise for every step still to run."""
        device = model_output.device
        self._tables = self.tables(device)
        first = self._step_index
        self._noise_offset = first
        noise = self.draw_noise(model_output.shape, model_output.dtype, generator, first)
        if noise is None:
            self._noise = None
            return
        if device.type == "cuda":
            noise = noise.pin_memory()
            self._noise_host = noise  # kept alive until the copy has run
        self._noise = noise.to(device, non_blocking=True)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run "
                             "'set_timesteps' after creating the scheduler")
        if self._step_index is None:
            self._init_step_index(timestep)
        if self._tables is None:
            self._prepare(model_output, generator)
        k = self._step_index
        noise = None
        if k != self.num_inference_steps - 1:
            noise = self._noise[k - self._noise_offset]
        prev_sample, denoised = self.update(self._tables, k, model_output, sample, noise)
        self._step_index += 1
        if not return_dict:
            return (prev_sample, denoised)
        return LCMSchedulerOutput(prev_sample=prev_sample, denoised=denoised)
