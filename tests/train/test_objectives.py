"""Timestep samplers and loss weightings against the papers' formulas, computed independently here in
float64 (numpy / scipy): min-SNR-gamma (Hang et al. 2023) for epsilon, v and flow targets; the SD3
paper's (Esser et al. 2024) logit-normal, mode and shifted samplers and sigma_sqrt / cosmap weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import optimize, stats

from crepa.config import ConfigError, load_config
from crepa.train.objectives import ddpm, flow_matching, loss_weights, sample_noise_level, weighted_mse
from helpers import run_cli, write_world

GAMMA = 5.0
STEPS = 1000
FIVE_TIMESTEPS = [0, 100, 400, 700, 999]


def scaled_linear_alpha_bar() -> np.ndarray:
    """CogVideoX's table without the zero-terminal rescale: betas linear in sqrt from 0.00085 to 0.012."""
    betas = np.linspace(math.sqrt(0.00085), math.sqrt(0.012), STEPS, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def levels_for(timesteps: list[int]) -> torch.Tensor:
    """Noise levels s whose DDPM timestep floor(s * T) is ``timesteps`` (the middle of each bin)."""
    return (torch.tensor(timesteps, dtype=torch.float64) + 0.5) / STEPS


@pytest.mark.parametrize("objective", ["v_prediction", "epsilon"])
def test_min_snr_weights_equal_the_closed_form_at_five_ddpm_timesteps(objective):
    alpha_bar = scaled_linear_alpha_bar()
    latents = torch.randn(5, 4, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    noised = ddpm(
        latents,
        torch.from_numpy(alpha_bar),
        torch.Generator().manual_seed(1),
        objective,
        levels_for(FIVE_TIMESTEPS),
    )
    assert noised.timesteps.tolist() == FIVE_TIMESTEPS
    weights = loss_weights("min_snr", objective, noised.snr, GAMMA)
    expected = []
    for t in FIVE_TIMESTEPS:  # Hang et al. 2023, eq. for each prediction target
        snr = alpha_bar[t] / (1 - alpha_bar[t])
        expected.append(min(snr, GAMMA) / snr if objective == "epsilon" else min(snr, GAMMA) / (snr + 1))
    np.testing.assert_allclose(weights.numpy(), expected, rtol=1e-5)
    assert weights[0] < weights[-1] or objective == "v_prediction"  # low noise is clipped for epsilon


def test_min_snr_epsilon_is_finite_at_zero_terminal_snr():
    weights = loss_weights("min_snr", "epsilon", torch.tensor([0.0, 1.0, 100.0]), GAMMA)
    assert weights.tolist() == pytest.approx([1.0, 1.0, GAMMA / 100.0])


def test_min_snr_flow_weights_are_the_x0_weighting_at_five_levels():
    s = np.array([0.02, 0.25, 0.5, 0.75, 0.98])
    noised = flow_matching(torch.zeros(5, 4, 1, 2, 2), torch.from_numpy(s).float(), torch.Generator())
    weights = loss_weights("min_snr", "flow_matching", noised.snr, GAMMA)
    # velocity error = x0 error / s (x0 = x_s - s v), so min(SNR, gamma) on x0 is min(SNR, gamma) s^2 on v
    snr = ((1 - s) / s) ** 2
    np.testing.assert_allclose(weights.numpy(), np.minimum(snr, GAMMA) * s**2, rtol=1e-5)


def test_sd3_weightings_at_five_levels():
    s = np.array([0.05, 0.25, 0.5, 0.75, 0.95])
    snr = torch.from_numpy(((1 - s) / s) ** 2).float()
    np.testing.assert_allclose(loss_weights("sigma_sqrt", "flow_matching", snr).numpy(), s**-2, rtol=1e-5)
    # cosmap: the density of t = 1 - 1 / (tan(pi u / 2) + 1), u uniform (SD3 section 3.1), by finite
    # differences of its inverse u(t) = (2 / pi) atan(t / (1 - t))
    h = 1e-6
    inverse = lambda t: 2 / math.pi * np.arctan(t / (1 - t))  # noqa: E731
    density = (inverse(s + h) - inverse(s - h)) / (2 * h)
    np.testing.assert_allclose(loss_weights("cosmap", "flow_matching", snr).numpy(), density, rtol=1e-5)
    with pytest.raises(ValueError, match="does not apply"):
        loss_weights("cosmap", "v_prediction", snr)


def test_weighted_mse_against_a_loop():
    generator = torch.Generator().manual_seed(2)
    prediction, target = torch.randn(3, 2, 4, generator=generator), torch.randn(3, 2, 4, generator=generator)
    weights = torch.tensor([0.5, 2.0, 1.0])
    expected = (
        sum(
            float(w) * float(((p - t) ** 2).mean())
            for w, p, t in zip(weights, prediction, target, strict=True)
        )
        / 3
    )
    assert float(weighted_mse(prediction, target, weights)) == pytest.approx(expected, rel=1e-6)


def _ks_pvalue(sampling: str, cdf, **settings) -> float:
    levels = sample_noise_level(20_000, torch.Generator().manual_seed(3), sampling, **settings).double()
    return stats.kstest(levels.numpy(), cdf).pvalue


def test_samplers_follow_their_distributions():
    # logit-normal: logit(s) ~ N(mean, std)
    assert _ks_pvalue("logit_normal", lambda x: stats.norm.cdf(np.log(x / (1 - x)), 0.5, 0.8),
                      logit_mean=0.5, logit_std=0.8) > 1e-3  # fmt: skip
    # shifted: s' = k s / (1 + (k - 1) s) with s uniform, so P(s' <= x) = x / (k - (k - 1) x)
    assert _ks_pvalue("shifted", lambda x: x / (3 - 2 * x), shift=3.0) > 1e-3

    # mode: s = f(u) = 1 - u - c (cos^2(pi u / 2) - 1 + u), decreasing, so P(s <= x) = 1 - f^-1(x)
    def mode_cdf(values: np.ndarray, scale: float = 1.29) -> np.ndarray:
        f = lambda u, x: 1 - u - scale * (math.cos(math.pi * u / 2) ** 2 - 1 + u) - x  # noqa: E731
        return np.array([1 - optimize.brentq(f, 0.0, 1.0, args=(x,)) for x in values])

    assert _ks_pvalue("mode", mode_cdf, mode_scale=1.29) > 1e-3
    assert _ks_pvalue("mode", lambda x: x, mode_scale=0.0) > 1e-3  # scale 0 is uniform


def test_ddpm_family_draws_timesteps_from_the_chosen_sampler(tmp_path):
    from crepa.models import FAMILIES
    from crepa.train.step import noise_batch

    run = write_world(tmp_path, "cogvideox")
    config = load_config(run, ['train.timestep_sampling="logit_normal"', "train.logit_std=0.5"])
    alpha_bar = torch.from_numpy(scaled_linear_alpha_bar())
    latents = torch.zeros(64, 4, 3, 2, 2)
    noised = noise_batch(config, FAMILIES["cogvideox"], latents, torch.Generator().manual_seed(4), alpha_bar)
    reference = torch.sigmoid(0.5 * torch.randn(64, generator=torch.Generator().manual_seed(4)))
    assert noised.timesteps.tolist() == (reference.double() * STEPS).floor().long().tolist()
    # the default stays the family's own draw: uniform integers from torch.randint
    default = noise_batch(
        load_config(run), FAMILIES["cogvideox"], latents, torch.Generator().manual_seed(4), alpha_bar
    )
    expected = torch.randint(0, STEPS, (64,), generator=torch.Generator().manual_seed(4))
    assert torch.equal(default.timesteps, expected)


def test_shifted_without_a_shift_is_refused(tmp_path):
    run = write_world(tmp_path, "wan")
    with pytest.raises(ConfigError, match=r"train\.timestep_sampling.*train\.shift"):
        load_config(run, ['train.timestep_sampling="shifted"'])
    assert load_config(run, ['train.timestep_sampling="shifted"', "train.shift=3.0"]).train.shift == 3.0


def test_flow_weighting_for_a_ddpm_family_exits_2_before_loading(tmp_path):
    run = write_world(tmp_path, "cogvideox")
    result = run_cli(
        "train", str(run), "--set", 'train.loss_weighting="cosmap"', "--no-progress", cwd=tmp_path
    )
    stderr = result.stderr
    assert result.returncode == 2 and "train.loss_weighting" in stderr and "min_snr" in stderr
