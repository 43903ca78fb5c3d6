"""The over-optimisation study's fitting code recovers known coefficients from synthetic points."""
import math

import torch

import study


def test_fit_rl_recovers_alpha_beta_and_peak():
    g = torch.Generator().manual_seed(0)
    d = torch.linspace(0.2, 4.0, 25, dtype=torch.float64)
    alpha, beta = 1.3, 0.6
    r = d * (alpha - beta * torch.log(d)) + 0.01 * torch.randn(25, generator=g, dtype=torch.float64)
    a, b = study.fit_rl(d, r)
    assert abs(a - alpha) < 0.02 and abs(b - beta) < 0.02, (a, b)
    assert abs(study.rl_peak(alpha, beta) - math.exp(alpha / beta - 1)) < 1e-12
    # the peak is where the curve is highest
    xs = torch.linspace(0.1, 10, 10000, dtype=torch.float64)
    best = xs[(xs * (alpha - beta * torch.log(xs))).argmax()].item()
    assert abs(study.rl_peak(alpha, beta) - best) < 0.01


def test_fit_bon_recovers_alpha_beta_and_peak():
    d = torch.linspace(0.1, 2.5, 20, dtype=torch.float64)
    alpha, beta = 2.0, 0.7
    a, b = study.fit_bon(d, d * (alpha - beta * d))
    assert abs(a - alpha) < 1e-9 and abs(b - beta) < 1e-9
    assert abs(study.bon_peak(a, b) - alpha / (2 * beta)) < 1e-9
    assert study.bon_peak(1.0, 0.0) == float("inf")
