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


def test_report_has_a_row_per_point_and_a_panel_per_low_beta(tmp_path, monkeypatch):
    """write_report: every best-of-n and PPO point is a table row (β = 0.05 included), and the figure has one panel
    for best-of-n and one for each of the two lowest β, with each reward model's curve on every panel it ran in
    (the ensemble ran only β = 0.01 here)."""
    bon = [{"n": n, "kl": k, "d": math.sqrt(k), "proxy": 0.1 * n, "gold": 1.0 + 0.2 * n, "gold_ceiling": 2.0 + n}
           for n, k in ((1, 0.0), (4, 0.636))]

    def run(slope):
        return [{"iter": i, "kl": 0.5 * i, "d": math.sqrt(0.5 * i), "proxy": 0.1 * i, "gold": 1.0 + slope * i}
                for i in (0, 10, 20)]

    results = {"rm": {"rm_val_accuracy_gold": 0.77, "rm_train_prompts": 4000, "bon": bon,
                      "ppo": {"0.0": run(-0.1), "0.01": run(0.02), "0.05": run(0.03)},
                      "fit_bon": {"alpha": 1.0, "beta": 0.5, "peak_d": 1.0},
                      "fit_rl": {"alpha": 0.5, "beta": 0.4, "peak_d": 3.5, "kl_coef": 0.0}},
               "ensemble_mean": {"rm_val_accuracy_gold": 0.78, "members": 3, "aggregate": "mean", "bon": bon,
                                 "ppo": {"0.01": run(0.05)}, "fit_bon": {"alpha": 1.1, "beta": 0.5, "peak_d": 1.1}},
               "seconds": 12.0}
    saved = {}
    try:
        import matplotlib.figure
        monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, path, **kw: saved.update(fig=fig))
    except ImportError:
        pass
    study.write_report(results, str(tmp_path))
    md = (tmp_path / "study.md").read_text()
    assert md.count("| PPO β = 0.05 | iter ") == 3 and md.count("| PPO β = 0.01 | iter ") == 6
    assert md.count("| best-of-n | n = ") == 4 and "aggregated by mean" in md
    assert "PPO (β = 0.0) fit" in md and md.count(" fit R(d)") == 3
    if saved:
        axes = saved["fig"].axes
        assert [a.get_title() for a in axes] == ["best-of-n", "PPO at fixed β = 0.0", "PPO at fixed β = 0.01"]
        labels = [[l.get_label() for l in a.get_lines()] for a in axes]
        assert "ensemble_mean gold" not in labels[1] and "ensemble_mean gold" in labels[2]
        assert "rm gold fit" in labels[1] and "rm gold fit" not in labels[2]
        gold = next(l for l in axes[2].get_lines() if l.get_label() == "ensemble_mean gold")
        assert list(gold.get_ydata()) == [0.0, 0.5, 1.0]  # gain over the run's first point
