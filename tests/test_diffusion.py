"""Diffusion schedules, noising and samplers: against diffusers, and against their own inverses."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from mixmodal.config import ConfigError, from_dict
from mixmodal.objectives.diffusion import (
    DDPMSchedule,
    DiffusionConfig,
    FlowSchedule,
    build_schedule,
    clean_patch_mask,
    ddim_step,
    ddpm_step,
    diffusion_loss,
    flow_step,
    patch_map,
    sampling_times,
)

DIFFUSERS_BETAS = {"cosine": "squaredcos_cap_v2", "linear": "linear"}


def schedule(kind: str = "ddpm", **kwargs):
    return build_schedule(DiffusionConfig(kind=kind, **kwargs))


def sample(shape=(4, 3, 8, 8), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype), torch.randn(shape, generator=g, dtype=dtype)


@pytest.mark.parametrize("name", ["cosine", "linear"])
def test_alphas_cumprod_match_diffusers(name):
    ours = schedule(schedule=name)
    theirs = DDPMScheduler(num_train_timesteps=1000, beta_schedule=DIFFUSERS_BETAS[name])
    assert isinstance(ours, DDPMSchedule) and ours.alphas_cumprod.dtype == torch.float32
    torch.testing.assert_close(ours.alphas_cumprod, theirs.alphas_cumprod, rtol=0, atol=1e-6)


def test_add_noise_matches_diffusers_for_integer_steps():
    ours = schedule()
    theirs = DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    x0, noise = sample()
    steps = torch.tensor([0, 17, 500, 999])
    t = ours.time_of_step(steps)
    assert torch.equal(ours.step_index(t), steps)
    # the tables differ by <= 3e-7 (float64 vs float32 product); sqrt(1 - alpha_bar) near
    # alpha_bar = 1 magnifies that to a few 1e-6
    torch.testing.assert_close(ours.add_noise(x0, noise, t), theirs.add_noise(x0, noise, steps), rtol=0, atol=1e-5)


def test_time_zero_is_clean_and_one_is_the_last_step():
    ours = schedule()
    assert ours.alpha_bar(0.0).item() == 1.0
    assert ours.alpha_bar(1.0).item() == ours.alphas_cumprod[-1].item() < 1e-8
    x0, noise = sample()
    assert torch.equal(ours.add_noise(x0, noise, 0.0), x0)
    assert torch.equal(schedule("flow").add_noise(x0, noise, 0.0), x0)
    assert torch.equal(schedule("flow").add_noise(x0, noise, 1.0), noise)


@pytest.mark.parametrize("kind", ["ddpm", "flow"])
def test_predict_x0_and_noise_invert_add_noise(kind):
    s = schedule(kind)
    x0, noise = sample(dtype=torch.float64)
    t = s.sample_times(4, generator=torch.Generator().manual_seed(1)).clamp(max=0.9)  # t -> 1 divides by ~0
    x_t = s.add_noise(x0, noise, t)
    target = s.target(x0, noise, t)
    torch.testing.assert_close(s.predict_x0(x_t, target, t), x0)
    torch.testing.assert_close(s.predict_noise(x_t, target, t), noise)
    expected = noise if kind == "ddpm" else noise - x0
    torch.testing.assert_close(target, expected)


@pytest.mark.parametrize("kind", ["ddpm", "flow"])
def test_sample_times_are_reproducible_and_respect_the_limit(kind):
    s = schedule(kind, noise_limit=250)
    limited = torch.arange(4000) % 2 == 0
    a = s.sample_times(4000, generator=torch.Generator().manual_seed(3), limited=limited)
    b = s.sample_times(4000, generator=torch.Generator().manual_seed(3), limited=limited)
    assert torch.equal(a, b) and a.dtype == torch.float32 and a.shape == (4000,)
    assert not torch.equal(a, s.sample_times(4000, generator=torch.Generator().manual_seed(4), limited=limited))
    assert a.min() > 0 and a.max() <= 1
    assert a[limited].max() <= 0.25 and a[~limited].max() > 0.9
    assert abs(a[~limited].mean().item() - 0.5) < 0.03 and abs(a[limited].mean().item() - 0.125) < 0.02
    if kind == "ddpm":
        steps = s.step_index(a)
        assert torch.equal(s.time_of_step(steps), a)  # times lie on the step grid
        assert steps[limited].max() == 249 and steps.min() == 0 and steps[~limited].max() == 999


def test_noise_limit_prob_caps_that_fraction():
    s = schedule(noise_limit=100, noise_limit_prob=0.3)
    t = s.sample_times(10_000, generator=torch.Generator().manual_seed(0), limited=torch.ones(10_000, dtype=torch.bool))
    assert abs((t > 0.1).float().mean().item() - 0.7 * 0.9) < 0.02  # uncapped rows land above the cap 90% of the time
    with pytest.raises(ValueError, match="limited must be a bool tensor"):
        s.sample_times(3, generator=torch.Generator(), limited=torch.ones(4, dtype=torch.bool))


def test_sampling_times_use_trailing_spacing():
    s = schedule()
    for num_steps in (1, 7, 50, 1000):
        times = sampling_times(s, num_steps)
        assert times.shape == (num_steps + 1,) and times[0] == 1 and times[-1] == 0
        assert bool((times[1:] < times[:-1]).all())
        theirs = DDPMScheduler(beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing")
        theirs.set_timesteps(num_steps)
        assert torch.equal(s.step_index(times[:-1]), theirs.timesteps)
    with pytest.raises(ValueError, match="num_steps"):
        sampling_times(s, 1001)


def test_ddim_with_the_exact_noise_recovers_x0():
    s = schedule()
    x0, noise = sample(dtype=torch.float64)
    times = sampling_times(s, 50)
    x = s.add_noise(x0, noise, times[0])
    for t, t_prev in zip(times[:-1], times[1:]):
        x = ddim_step(s, x, s.target(x0, noise, t), t, t_prev)
    torch.testing.assert_close(x, x0, rtol=0, atol=1e-6)


def test_ddim_matches_diffusers():
    s = schedule()
    theirs = DDIMScheduler(beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing", clip_sample=False)
    theirs.set_timesteps(20)
    x = ours = sample()[0]
    times = sampling_times(s, 20)
    for i, step in enumerate(theirs.timesteps):
        prediction = torch.tanh(x) * 0.5  # any deterministic "model"
        x = theirs.step(prediction, step, x).prev_sample
        ours = ddim_step(s, ours, torch.tanh(ours) * 0.5, times[i], times[i + 1])
        torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)


def test_ddpm_step_matches_diffusers():
    s = schedule()
    theirs = DDPMScheduler(beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing", clip_sample=False)
    theirs.set_timesteps(10)
    ours_generator, their_generator = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    x = ours = sample()[0]
    times = sampling_times(s, 10)
    for i, step in enumerate(theirs.timesteps):
        x = theirs.step(torch.tanh(x) * 0.5, step, x, generator=their_generator).prev_sample
        ours = ddpm_step(s, ours, torch.tanh(ours) * 0.5, times[i], times[i + 1], ours_generator)
        torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)
    with pytest.raises(TypeError, match="DDPMSchedule"):
        ddpm_step(schedule("flow"), x, x, 1.0, 0.5, ours_generator)


def test_ddpm_step_with_the_exact_noise_reaches_x0_without_noise_at_the_end():
    s = schedule()
    x0, noise = sample(dtype=torch.float64)
    x = s.add_noise(x0, noise, 0.02)
    out = ddpm_step(s, x, noise, 0.02, 0.0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x0)


def test_flow_euler_with_the_exact_velocity_recovers_x0_and_equals_ddim():
    s = schedule("flow")
    assert isinstance(s, FlowSchedule)
    x0, noise = sample()
    times = sampling_times(s, 25)
    x = y = s.add_noise(x0, noise, 1.0)
    for t, t_prev in zip(times[:-1], times[1:]):
        x = flow_step(x, s.target(x0, noise, t), t, t_prev)
        y = ddim_step(s, y, s.target(x0, noise, t), t, t_prev)
    torch.testing.assert_close(x, x0, rtol=0, atol=1e-5)
    torch.testing.assert_close(y, x, rtol=0, atol=1e-5)


def test_per_row_times_broadcast():
    s = schedule()
    x0, noise = sample()
    t = torch.tensor([0.1, 0.2, 0.3, 0.4])
    rows = torch.cat([s.add_noise(x0[i : i + 1], noise[i : i + 1], t[i].item()) for i in range(4)])
    torch.testing.assert_close(s.add_noise(x0, noise, t), rows)
    with pytest.raises(ValueError, match="t has shape"):
        s.add_noise(x0, noise, torch.tensor([0.1, 0.2]))


def test_bf16_inputs_keep_their_dtype_and_the_loss_is_float32():
    s = schedule()
    x0, noise = (a.bfloat16() for a in sample())
    x_t = s.add_noise(x0, noise, torch.full((4,), 0.5))
    assert x_t.dtype == torch.bfloat16
    loss = diffusion_loss(noise, torch.zeros_like(noise), weight=5.0)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, 5.0 * noise.float().square().mean())
    with pytest.raises(ValueError, match="differ in shape"):
        diffusion_loss(noise, noise[:1], weight=1.0)


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"noise_limit": 0}, "noise_limit"),
        ({"noise_limit": 1001}, "noise_limit"),
        ({"noise_limit_prob": 1.5}, "noise_limit_prob"),
        ({"num_timesteps": 1}, "num_timesteps"),
        ({"loss_weight": -1.0}, "loss_weight"),
        ({"kind": "edm"}, "kind"),
        ({"clean_patches": 1.5}, "clean_patches"),
    ],
)
def test_config_errors_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        DiffusionConfig(**overrides)


@dataclass
class RunConfig:
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)


def test_config_errors_name_the_path_when_nested():
    with pytest.raises(ConfigError, match=r"diffusion: noise_limit must be in \[1, num_timesteps=1000\], got 0"):
        from_dict(RunConfig, {"diffusion": {"noise_limit": 0}})


@pytest.mark.parametrize("kind", ["ddpm", "flow"])
def test_logit_normal_time_sampling_concentrates_on_middle_noise_and_respects_the_cap(kind):
    from mixmodal.objectives.diffusion import DiffusionConfig, build_schedule

    n = 20_000
    uniform = build_schedule(DiffusionConfig(kind=kind)).sample_times(n, generator=torch.Generator().manual_seed(0))
    schedule = build_schedule(DiffusionConfig(kind=kind, time_sampling="logit_normal", logit_mean=0.5))
    t = schedule.sample_times(n, generator=torch.Generator().manual_seed(0))
    assert ((t > 0) & (t <= 1)).all()
    middle = lambda x: float(((x > 0.25) & (x < 0.75)).float().mean())  # noqa: E731
    assert middle(t) > middle(uniform) + 0.1
    # sigmoid(N(0.5, 1)) has median sigmoid(0.5): the mean shifts towards noise for both kinds
    assert abs(float(t.median()) - float(torch.sigmoid(torch.tensor(0.5)))) < 0.02
    limited = torch.ones(n, dtype=torch.bool)
    capped = schedule.sample_times(n, generator=torch.Generator().manual_seed(1), limited=limited)
    assert float(capped.max()) <= 0.5 + 1e-6
    with pytest.raises(ValueError, match="time_sampling"):
        DiffusionConfig(time_sampling="beta")


# --- clean patches (MAR-like training for the patch_groups sampler) ---------------------------

def test_clean_patch_masks_leave_every_chosen_image_something_to_learn():
    g = torch.Generator().manual_seed(0)
    mask = clean_patch_mask(4000, 9, 0.5, g)
    assert mask.shape == (4000, 9) and mask.dtype == torch.bool
    counts = mask.sum(1)
    assert counts.max() == 8  # never all 9: a chosen image keeps at least one noisy patch
    chosen = counts > 0  # k = 0 is possible too, so slightly under half the images have any
    assert 0.40 < chosen.float().mean() < 0.48
    per_k = torch.bincount(counts[chosen], minlength=9)[1:].float() / chosen.sum()
    assert (per_k - 1 / 8).abs().max() < 0.03  # k uniform over 1..8 among them
    assert (mask.float().mean(0) - mask.float().mean()).abs().max() < 0.02  # every patch alike
    assert torch.equal(clean_patch_mask(4000, 9, 0.5, torch.Generator().manual_seed(0)), mask)
    assert not clean_patch_mask(50, 9, 0.0, g).any()


def test_patch_map_spreads_each_patch_over_its_pixels():
    values = torch.arange(8.0).view(2, 4)  # 2 images, 2 x 2 patches
    out = patch_map(values, 3)
    assert out.shape == (2, 1, 6, 6)
    assert torch.equal(out[1, 0, :3, 3:], torch.full((3, 3), 5.0))  # image 1, patch (0, 1)
    assert torch.equal(out[0, 0, 3:, :3], torch.full((3, 3), 2.0))  # image 0, patch (1, 0)
    with pytest.raises(ValueError, match="not a square grid"):
        patch_map(torch.zeros(1, 3), 2)


@pytest.mark.parametrize("kind", ["ddpm", "flow"])
def test_per_element_times_noise_each_element_at_its_own_time(kind):
    s = schedule(kind)
    x0, noise = sample()
    t = torch.rand(4, 1, 8, 8)
    expected = torch.stack([s.add_noise(x0[i:i + 1].flatten(2)[..., j], noise[i:i + 1].flatten(2)[..., j],
                                        t[i].flatten()[j:j + 1]) for i in range(4) for j in range(64)])
    got = s.add_noise(x0, noise, t).flatten(2).permute(0, 2, 1).reshape(4 * 64, 1, 3)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    with pytest.raises(RuntimeError):
        s.add_noise(x0, noise, torch.rand(4, 1, 4, 4))


def test_the_element_mask_averages_only_the_elements_that_carry_loss():
    prediction, target = sample()
    full = torch.ones(4, 1, 8, 8, dtype=torch.bool)
    torch.testing.assert_close(diffusion_loss(prediction, target, weight=5.0, element_mask=full),
                               diffusion_loss(prediction, target, weight=5.0), atol=1e-6, rtol=1e-6)
    mask = torch.zeros(4, 1, 8, 8, dtype=torch.bool)
    mask[0, :, :2] = True  # image 0: two rows; image 1: one pixel; images 2 and 3: nothing
    mask[1, 0, 5, 5] = True
    err = (prediction - target).square()
    expected = (err[0, :, :2].mean() + err[1, :, 5, 5].mean()) / 2
    torch.testing.assert_close(diffusion_loss(prediction, target, weight=1.0, element_mask=mask), expected)
    weights = torch.tensor([1.0, 3.0, 1.0, 1.0])
    expected = (err[0, :, :2].mean() + 3 * err[1, :, 5, 5].mean()) / 4
    torch.testing.assert_close(diffusion_loss(prediction, target, weight=1.0, image_weights=weights,
                                              element_mask=mask), expected)


def test_patch_code_loss_is_a_per_image_mean_over_kept_patches_weighted_by_image():
    from mixmodal.objectives.diffusion import patch_code_loss

    g = torch.Generator().manual_seed(0)
    logits, codes = torch.randn(3, 4, 5, generator=g), torch.randint(0, 5, (3, 4), generator=g)
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), codes.flatten(), reduction="none").view(3, 4)
    assert torch.allclose(patch_code_loss(logits, codes, weight=2.0), 2.0 * ce.mean())
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    weights = torch.tensor([1.0, 5.0, 3.0])  # the second image keeps no patch: it weighs nothing
    want = (1.0 * ce[0, :2].mean() + 3.0 * ce[2, 0]) / 4.0
    assert torch.allclose(patch_code_loss(logits, codes, weight=1.0, image_weights=weights, patch_mask=mask), want)
    with pytest.raises(ValueError, match="do not match codes"):
        patch_code_loss(logits, codes[:, :3], weight=1.0)
