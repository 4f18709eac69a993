"""Diffusion samplers as objects (objectives/samplers.py), without an engine: the time grids, the
step each one takes, and which schedules each can drive."""

from __future__ import annotations

import pytest
import torch

from mixmodal.objectives.diffusion import DiffusionConfig, build_schedule, ddim_step, ddpm_step, flow_step, \
    sampling_times
from mixmodal.objectives.samplers import DDIMSampler, DDPMSampler, FlowSampler, PatchTurns, make_sampler


def schedule(kind="ddpm", **kwargs):
    return build_schedule(DiffusionConfig(kind=kind, **kwargs))


def test_auto_picks_euler_for_flow_and_ddim_for_ddpm_and_refuses_what_a_schedule_cannot_drive():
    assert isinstance(make_sampler("auto", schedule("flow")), FlowSampler)
    assert isinstance(make_sampler("auto", schedule("ddpm")), DDIMSampler)
    assert isinstance(make_sampler("ddim", schedule("flow")), DDIMSampler)
    assert isinstance(make_sampler("ddpm", schedule("ddpm")), DDPMSampler)
    with pytest.raises(ValueError, match="sampler=ddpm needs a model trained with diffusion.kind=ddpm"):
        make_sampler("ddpm", schedule("flow"))
    with pytest.raises(ValueError, match="sampler=flow needs a model trained with diffusion.kind=flow"):
        make_sampler("flow", schedule("ddpm"))
    with pytest.raises(ValueError, match="one of auto, ddpm, ddim, flow"):
        make_sampler("euler", schedule("flow"))


def test_a_cosine_ddpm_grid_drops_its_pure_noise_step_and_others_keep_the_trailing_grid():
    cosine, flow = schedule(schedule="cosine"), schedule("flow")
    assert float(cosine.alpha_bar(1.0)) < 1e-4
    times = make_sampler("ddim", cosine).times(50)
    assert len(times) == 51 and float(times[0]) < 1.0 and float(times[-1]) == 0.0
    torch.testing.assert_close(times, sampling_times(cosine, 51)[1:])
    flow_times = make_sampler("auto", flow).times(25)
    torch.testing.assert_close(flow_times, sampling_times(flow, 25))  # flow keeps t = 1: noise is its input
    assert float(flow_times[0]) == 1.0 and len(flow_times) == 26
    assert torch.all(flow_times[1:] < flow_times[:-1])
    # at the schedule's resolution the grid cannot take one more point than it has steps
    assert len(make_sampler("ddim", cosine).times(cosine.num_timesteps)) == cosine.num_timesteps


def test_each_sampler_takes_its_step_function():
    x, pred = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    s = schedule()
    torch.testing.assert_close(make_sampler("ddim", s).step(x, pred, 0.5, 0.3), ddim_step(s, x, pred, 0.5, 0.3))
    ours = make_sampler("ddpm", s).step(x, pred, 0.5, 0.3, torch.Generator().manual_seed(3))
    torch.testing.assert_close(ours, ddpm_step(s, x, pred, 0.5, 0.3, torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError, match="torch.Generator"):
        make_sampler("ddpm", s).step(x, pred, 0.5, 0.3)
    f = schedule("flow")
    torch.testing.assert_close(make_sampler("flow", f).step(x, pred, 0.5, 0.3), flow_step(x, pred, 0.5, 0.3))


def test_walking_a_grid_with_the_exact_prediction_reaches_the_data():
    x0 = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    for kind, name in (("flow", "flow"), ("flow", "ddim"), ("ddpm", "ddim")):
        s = schedule(kind)
        sampler = make_sampler(name, s)
        times = sampler.times(20)
        x = s.add_noise(x0, noise, float(times[0]))
        for t, t_prev in zip(times[:-1], times[1:]):
            x = sampler.step(x, s.target(x0, noise, t), t, t_prev)
        torch.testing.assert_close(x, x0, rtol=0, atol=1e-4)


def test_patch_turns_commit_each_group_once_and_keep_what_they_committed():
    turns = PatchTurns(9, 3, 2, torch.Generator().manual_seed(0))  # 3 x 3 patches of 2 x 2 latent pixels
    assert sorted(torch.cat(turns.groups).tolist()) == list(range(9)) and [len(g) for g in turns.groups] == [3, 3, 3]
    assert torch.equal(turns.times(0.7), torch.full((9,), 0.7))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, 6, generator=g)
    first = turns.groups[0]
    again = turns.next_turn(x, g)
    assert turns.clean.sum() == 3 and turns.clean[first].all()
    times = turns.times(0.4)
    assert torch.equal(times == 0, turns.clean) and torch.allclose(times[~turns.clean], torch.tensor(0.4))
    pixels = turns.pixels()
    assert pixels.shape == (1, 6, 6) and int(pixels.sum()) == 3 * 4
    assert torch.equal(again[:, pixels[0]], x[:, pixels[0]])  # committed: kept
    assert not torch.equal(again[:, ~pixels[0]], x[:, ~pixels[0]])  # the rest: fresh noise
    assert torch.equal(turns.hold(again, torch.zeros_like(x))[:, pixels[0]], x[:, pixels[0]])
    assert turns.next_turn(again, g) is not None and turns.clean.sum() == 6
    assert turns.next_turn(again, g) is None and turns.clean.sum() == 6  # the last group: the image is done
    assert [len(g) for g in PatchTurns(4, 9, 1, torch.Generator()).groups] == [1, 1, 1, 1]  # at most a patch a turn
