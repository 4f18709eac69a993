"""Diffusion samplers as objects beside their schedules (diffusers' scheduler shape, without
its state): `times(steps)` gives the descending grid of times a generation walks, and
`step(x, prediction, t, t_prev, generator)` takes one step of it. The inference engine
holds one per generation config and never looks inside; the step functions themselves
(`ddpm_step`, `ddim_step`, `flow_step`) live with the schedules in objectives/diffusion.py.

    sampler = make_sampler("auto", schedule)          # flow (Euler) for a flow model, else ddim
    times = sampler.times(25)                           # (26,) from noise to 0
    for i in range(25):
        x = sampler.step(x, model(x, times[i]), times[i], times[i + 1], generator)
"""

from __future__ import annotations

import torch
from torch import Tensor

from mixmodal.objectives.diffusion import DDPMSchedule, FlowSchedule, Schedule, ddim_step, ddpm_step, flow_step, \
    patch_map, sampling_times

SAMPLERS = ("auto", "ddpm", "ddim", "flow")


class Sampler:
    """One way to walk a schedule from noise to data."""

    name = "sampler"

    def __init__(self, schedule: Schedule) -> None:
        self.schedule = schedule

    def times(self, steps: int) -> Tensor:
        """(steps + 1,) float32 times from noise down to 0. A DDPM schedule whose last step is (almost)
        pure noise (the cosine one: alpha_bar(1) = 2e-9) leaves that step out: there an epsilon
        prediction says nothing about x0, and the first step would multiply its error by
        sqrt(alpha_bar(t_1) / alpha_bar(1)) (~600 at 50 steps), giving noise. The grid is then the
        trailing grid of steps + 1 points without its first, so sampling starts from pure noise at
        alpha_bar ~1e-3 (diffusers' "leading" spacing does the same)."""
        s = self.schedule
        if isinstance(s, DDPMSchedule) and float(s.alpha_bar(1.0)) < 1e-4:
            return sampling_times(s, min(steps + 1, s.num_timesteps))[1:]
        return sampling_times(s, steps)

    def step(self, x: Tensor, prediction: Tensor, t: float, t_prev: float,
             generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.schedule).__name__})"


class DDIMSampler(Sampler):
    """Deterministic DDIM (eta = 0); for a flow schedule it equals the Euler step."""

    name = "ddim"

    def step(self, x, prediction, t, t_prev, generator=None):
        return ddim_step(self.schedule, x, prediction, t, t_prev)


class DDPMSampler(Sampler):
    """Ancestral DDPM: a draw from q(x_prev | x_t, x0_hat); the noise comes from `generator`."""

    name = "ddpm"

    def step(self, x, prediction, t, t_prev, generator=None):
        if generator is None:
            raise ValueError("the ddpm sampler draws noise at every step: pass a torch.Generator")
        return ddpm_step(self.schedule, x, prediction, t, t_prev, generator)


class FlowSampler(Sampler):
    """Euler steps of the flow ODE dx/dt = velocity."""

    name = "flow"

    def step(self, x, prediction, t, t_prev, generator=None):
        return flow_step(x, prediction, t, t_prev)


class PatchTurns:
    """The patch_groups sampler's bookkeeping (GenerationConfig.patch_groups; MAR-like): a random order
    from `generator` splits an image's P patches into `groups`; each turn walks the whole time grid
    over the patches not yet committed, told t = 0 for the committed ones (as diffusion.clean_patches
    trains), and ends by committing its group and re-noising the rest."""

    def __init__(self, num_patches: int, groups: int, patch_size: int, generator: torch.Generator) -> None:
        order = torch.randperm(num_patches, generator=generator)
        self.groups = list(torch.tensor_split(order, min(groups, num_patches)))
        self.clean = torch.zeros(num_patches, dtype=torch.bool)
        self.patch_size = patch_size

    def times(self, t: float) -> Tensor:
        """(P,) float32: the time each patch is told, 0 for the committed ones."""
        return torch.where(self.clean, 0.0, t).to(torch.float32)

    def pixels(self) -> Tensor:
        """bool (1, h, w): the committed patches' latent pixels (broadcasts against (C, h, w))."""
        return patch_map(self.clean[None], self.patch_size)[0]

    def hold(self, before: Tensor, after: Tensor) -> Tensor:
        """A step's result with the committed patches kept as they were."""
        return torch.where(self.pixels(), before, after)

    def next_turn(self, x: Tensor, generator: torch.Generator) -> Tensor | None:
        """At the end of a turn: commit its group and return the latents to walk the grid again from
        (the others drawn afresh from `generator`), or None when that was the last group."""
        if len(self.groups) == 1:
            return None
        self.clean[self.groups.pop(0)] = True
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        return torch.where(self.pixels(), x, noise)


def make_sampler(name: str, schedule: Schedule) -> Sampler:
    """The sampler `name` (auto: flow for a flow model, ddim for a DDPM one) over `schedule`; a
    sampler the schedule cannot drive is refused with the ones it can."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}; got {name!r}")
    flow = isinstance(schedule, FlowSchedule)
    if name == "auto":
        name = "flow" if flow else "ddim"
    if name == "ddpm" and not isinstance(schedule, DDPMSchedule):
        raise ValueError("sampler=ddpm needs a model trained with diffusion.kind=ddpm; use flow or ddim")
    if name == "flow" and not flow:
        raise ValueError("sampler=flow needs a model trained with diffusion.kind=flow; use ddim or ddpm")
    return {"ddim": DDIMSampler, "ddpm": DDPMSampler, "flow": FlowSampler}[name](schedule)


__all__ = ["DDIMSampler", "DDPMSampler", "FlowSampler", "PatchTurns", "SAMPLERS", "Sampler", "make_sampler"]
