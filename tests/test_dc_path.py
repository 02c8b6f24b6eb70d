"""The shifted-CG refinement path and the per-input choice of its weight."""

from __future__ import annotations

import numpy as np
import pytest

from bids_qsmnet.inference.refine import AutoLambda, DCSettings, dc_settings, refine_adaptive
from bids_qsmnet.physics.dc_path import data_residual, refine_path
from bids_qsmnet.physics.dipole import forward_field
from bids_qsmnet.physics.inversion import data_consistency


def _problem(shape=(36, 40, 32), seed=0):
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    g = np.meshgrid(*[np.arange(n) - n / 2 for n in shape], indexing="ij")
    mask = (g[0] / 14) ** 2 + (g[1] / 16) ** 2 + (g[2] / 12) ** 2 < 1
    chi = ndi.gaussian_filter(rng.normal(0, 0.05, shape), 1.5) * mask
    field = forward_field(chi, pad=8) * mask + rng.normal(0, 0.002, shape) * mask
    return chi, field, mask


@pytest.mark.parametrize("highpass_mm", [0.0, 4.0])
def test_every_lambda_of_the_path_is_the_single_lambda_solution(highpass_mm):
    """With B0 along an axis (the network frame, where the app refines) the path equals the
    float64 complex-FFT solver to float32 rounding."""
    chi, field, mask = _problem()
    prior = 0.6 * chi
    lams = [0.003, 0.03, 0.3]
    path = refine_path(prior, field, mask.astype(float), lams, n_iter=25, pad=8,
                       highpass_mm=highpass_mm, voxel_size=(1.0, 1.0, 1.2))
    for lam, got in zip(lams, path.chis):
        want = data_consistency(prior, field, mask, lam=lam, n_iter=25, pad=8,
                                highpass_mm=highpass_mm, voxel_size=(1.0, 1.0, 1.2))
        assert np.abs(got - want).max() < 1e-5 * np.abs(want).max()
    # smaller λ trusts the field more: lower residual, larger step from the prior
    assert np.all(np.diff(path.residuals) > 0) and np.all(np.diff(path.steps) < 0)
    assert path.residuals[-1] < path.residual_prior


def test_data_residual_is_zero_for_the_field_of_the_map_and_one_for_nothing():
    chi, _, mask = _problem()
    exact = forward_field(chi, pad=8) * mask
    assert data_residual(chi, exact, mask.astype(float), pad=8) < 1e-5
    assert data_residual(np.zeros_like(chi), exact, mask.astype(float)) == pytest.approx(1.0)


def test_the_rule_trusts_fields_the_map_explains_and_keeps_the_map_otherwise():
    rule = AutoLambda(floor=0.3, e_ref=0.05, lambda_ref=0.01, power=3.0)
    lams = [rule.choose(r) for r in (0.2, 0.35, 0.45, 0.6)]
    assert lams[0] == lams[1] or lams[0] < lams[1]  # below the floor: the smallest weight
    assert lams[1] < lams[2] < lams[3]
    assert rule.choose(0.99) is None  # nothing explained: the network's map is kept
    assert AutoLambda.from_dict(rule.to_dict()) == rule
    with pytest.raises(ValueError, match="impossible"):
        AutoLambda.from_dict({**rule.to_dict(), "e_ref": 0.0})
    with pytest.raises(ValueError, match="numbers"):
        AutoLambda.from_dict({**rule.to_dict(), "power": "high"})


def test_the_rule_discounts_the_fields_white_noise():
    """With ``noise`` 1 the share ν of the field's energy that is white noise is taken off ρ₀²
    before λ is chosen: a field whose extra unexplained part is all noise gets the λ of an
    accurate one; without the key (older model files) the rule is ρ₀'s alone."""
    rule = AutoLambda(floor=0.3, e_ref=0.05, lambda_ref=0.01, power=2.0, noise=1.0)
    assert rule.choose(np.sqrt(0.45**2 + 0.1), nu=0.1) == pytest.approx(rule.choose(0.45))
    assert rule.choose(0.5, nu=0.1) < rule.choose(0.5, nu=0.0)
    assert rule.excess(0.5, 0.1) == pytest.approx(0.5**2 - 0.1 - 0.3**2)
    plain = {k: v for k, v in rule.to_dict().items() if k != "noise"}
    assert AutoLambda.from_dict(plain).noise == 0.0
    assert AutoLambda.from_dict(plain).choose(0.5, nu=0.1) == AutoLambda.from_dict(
        plain).choose(0.5)
    with pytest.raises(ValueError, match="impossible"):
        AutoLambda.from_dict({**rule.to_dict(), "noise": -1.0})


def test_settings_choose_auto_from_the_model_file_and_numbers_override_it():
    auto = AutoLambda(floor=0.3, e_ref=0.05, lambda_ref=0.01, power=2.0).to_dict()
    d = {"dc_lambda": 0.1, "dc_auto": auto}
    assert dc_settings(d).auto is not None
    assert dc_settings(d, lam=0.05) == DCSettings(0.05, 30)
    assert dc_settings(d, lam="auto").auto == AutoLambda.from_dict(auto)
    with pytest.raises(ValueError, match="dc_auto"):
        dc_settings({"dc_lambda": 0.1}, lam="auto")
    assert dc_settings(d).to_dict()["lambda"] == "auto"


def test_adaptive_refinement_reports_what_it_chose():
    chi, field, mask = _problem()
    rule = AutoLambda(floor=0.0, e_ref=0.05, lambda_ref=0.01, power=1.0)
    settings = DCSettings(0.0, 20, auto=rule)
    prior = 0.5 * chi
    out, report = refine_adaptive(prior, field, mask, settings)
    rho0 = data_residual(prior * mask, field * mask, mask.astype(float))
    assert report["rho0"] == pytest.approx(rho0, abs=1e-4)
    assert report["lambda"] == pytest.approx(rule.choose(rho0))
    assert report["residual"] < report["rho0"]
    assert np.abs(out - refine_path(prior, field * mask, mask.astype(float),
                                    [report["lambda"]], n_iter=20).chis[0]).max() < 1e-7
    # a map that explains none of the field: λ above the rule's maximum, the map is kept
    keep = DCSettings(0.0, 20, auto=AutoLambda(floor=0.0, e_ref=0.01, lambda_ref=1.0,
                                                power=3.0))
    out, report = refine_adaptive(np.zeros_like(chi), field, mask, keep)
    assert report["lambda"] == 0.0 and np.all(out == 0)


def test_a_converging_single_weight_is_solved_by_pcg_to_the_exact_solution():
    """Where ``n_iter`` CG iterations provably solve the system, the preconditioned solver
    reaches the same solution (the float64 complex-FFT solver run to convergence) in fewer
    iterations; where they do not (small λ, few iterations), CG's early-stopped iterate is
    kept as it is."""
    chi, field, mask = _problem()
    prior = 0.6 * chi
    path = refine_path(prior, field, mask.astype(float), [0.03], n_iter=30, pad=8)
    exact = data_consistency(prior, field, mask, lam=0.03, n_iter=300, pad=8)
    assert path.solver == "pcg" and path.iterations < 15
    assert np.abs(path.chis[0] - exact).max() < 1e-4 * np.abs(exact).max()
    early = refine_path(prior, field, mask.astype(float), [0.001], n_iter=10, pad=8)
    want = data_consistency(prior, field, mask, lam=0.001, n_iter=10, pad=8)
    assert early.solver == "cg" and early.iterations == 10
    assert np.abs(early.chis[0] - want).max() < 1e-5 * np.abs(want).max()
    solved = data_consistency(prior, field, mask, lam=0.001, n_iter=300, pad=8)
    assert np.abs(early.chis[0] - solved).max() > 1e-2 * np.abs(solved).max()


def _piecewise(shape=(40, 44, 36), seed=3):
    """Ellipsoids of constant χ (ppm) in an ellipsoidal brain, its field with 1 ppb noise."""
    rng = np.random.default_rng(seed)
    g = np.meshgrid(*[np.arange(n) - n / 2 for n in shape], indexing="ij")
    ell = lambda c, r: sum(((x - ci) / ri) ** 2 for x, ci, ri in zip(g, c, r)) < 1  # noqa: E731
    mask = ell((0, 0, 0), (16, 18, 14))
    chi = np.where(mask, -0.02, 0.0)
    for c, r, v in (((-5, 4, 0), (5, 3, 4), 0.12), ((6, -3, 2), (4, 5, 3), 0.08),
                    ((0, 8, -6), (3, 3, 3), -0.06), ((2, -7, 5), (2.5, 2.5, 6), 0.2)):
        chi[ell(c, r)] = v
    chi = chi * mask
    field = (forward_field(chi, pad=8) + rng.normal(0, 0.001, shape)) * mask
    return chi, field, mask


def test_tv_refinement_is_admm_from_the_network_map_with_the_chosen_weight():
    """With a TV weight the refinement runs ``tv_iterations`` ADMM iterations from the
    network's map (the plain TV-ADMM with ``chi0`` and the prior weight the rule chose),
    restores contrast a shrunk map lost, and reports solver, λ, ρ₀ and the residual after."""
    from bids_qsmnet.metrics import nrmse
    from bids_qsmnet.physics.inversion import tv_admm
    from bids_qsmnet.physics.noise import noise_share

    chi, field, mask = _piecewise()
    rule = AutoLambda(floor=0.0, e_ref=0.05, lambda_ref=0.01, power=1.0)
    settings = dc_settings({"dc_auto": rule.to_dict(), "dc_tv": 1e-4, "dc_tv_iterations": 40})
    assert (settings.tv, settings.tv_iterations) == (1e-4, 40)
    prior = 0.6 * chi
    out, report = refine_adaptive(prior, field, mask, settings)
    rho0 = data_residual(prior * mask, field * mask, mask.astype(float))
    assert report["solver"] == "tv-admm" and report["iterations_run"] == 40
    assert report["tv"] == 1e-4 and report["lambda"] == pytest.approx(rule.choose(rho0))
    assert report["residual"] < report["rho0"]
    want = tv_admm(field * mask, mask, lam=1e-4, chi0=prior * mask,
                   prior_weight=report["lambda"], n_iter=40, tol=0.0, pad=8)
    assert np.abs(out - want).max() < 1e-6
    assert nrmse(out, chi, mask, demean=True) < 0.6 * nrmse(prior, chi, mask, demean=True)
    # the field's 1 ppb noise is measured and, with a rule that discounts it, taken off
    noisy_rule = AutoLambda(floor=0.0, e_ref=0.05, lambda_ref=0.01, power=1.0, noise=1.0)
    _, report = refine_adaptive(prior, field, mask, dc_settings(
        {"dc_auto": noisy_rule.to_dict(), "dc_tv": 1e-4, "dc_tv_iterations": 5}))
    # (sharp 0.2 ppm edges touch many of this small volume's blocks: σ̂ reads a little high)
    assert report["noise_ppb"] == pytest.approx(1.0, rel=0.25)
    assert report["noise_share"] == pytest.approx(noise_share(field * mask, mask), abs=1e-4)
    assert report["lambda"] == pytest.approx(noisy_rule.choose(rho0, report["noise_share"]),
                                             rel=1e-3)
    # the plain refinement when asked for (tv 0), and a high-pass it cannot honour refused
    assert dc_settings({"dc_tv": 1e-4}, tv=0.0).tv == 0.0
    with pytest.raises(ValueError, match="high-pass"):
        dc_settings({"dc_tv": 1e-4, "dc_highpass_mm": 4.0})
    with pytest.raises(ValueError, match="non-negative"):
        dc_settings({"dc_tv": -1.0})


def test_tv_penalty_scale_trades_iterations_for_larger_admm_steps():
    """``dc_tv_penalty_scale`` c runs the ADMM with ρ = 100 c α and ρ_d = 1/c: n iterations
    then land near the map of c·n iterations with FANSI's penalties (c = 1), much nearer
    than n iterations with them, and as close to the truth; the file's value reaches
    ``tv_admm``, the report and the sidecar's settings."""
    from bids_qsmnet.inference.refine import tv_penalties
    from bids_qsmnet.metrics import nrmse
    from bids_qsmnet.physics.inversion import tv_admm

    assert tv_penalties(1e-4, 3.0) == pytest.approx({"rho": 3e-2, "rho_data": 1 / 3})
    assert tv_penalties(2e-4) == pytest.approx({"rho": 2e-2, "rho_data": 1.0})
    chi, field, mask = _piecewise()
    prior = 0.6 * chi

    def run(n, c):
        return refine_adaptive(prior, field, mask, DCSettings(
            1e-3, 30, tv=1e-4, tv_iterations=n, tv_penalty_scale=c))

    ref, _ = run(60, 1.0)
    fast, report = run(20, 3.0)
    short, _ = run(20, 1.0)
    rms = lambda x: float(np.sqrt(np.mean(x[mask] ** 2)))  # noqa: E731
    assert rms(fast - ref) < 0.1 * rms(ref) and rms(fast - ref) < 0.5 * rms(short - ref)
    assert nrmse(fast, chi, mask, demean=True) < nrmse(ref, chi, mask, demean=True) + 1.0
    want = tv_admm(field * mask, mask, lam=1e-4, rho=3e-2, rho_data=1 / 3,
                   chi0=prior * mask, prior_weight=1e-3, n_iter=20, tol=0.0, pad=8)
    assert np.abs(fast - want).max() < 1e-6
    assert report["penalty_scale"] == 3.0 and report["iterations_run"] == 20
    settings = dc_settings({"dc_lambda": 1e-3, "dc_tv": 1e-4, "dc_tv_iterations": 20,
                            "dc_tv_penalty_scale": 3.0})
    assert settings.tv_penalty_scale == 3.0 and settings.to_dict()["penalty_scale"] == 3.0
    assert dc_settings({"dc_tv": 1e-4}).tv_penalty_scale == 1.0  # files without it: FANSI's
    with pytest.raises(ValueError, match="penalty scale must be positive"):
        dc_settings({"dc_tv": 1e-4, "dc_tv_penalty_scale": 0.0})


@pytest.mark.parametrize("tv", [0.0, 1e-4])
def test_refine_grid_gives_the_fixed_weight_refinements(tv):
    """``refine_grid``: for every λ the map the refinement makes with that fixed λ (plain or
    TV), with ρ₀ and the residual of each."""
    from bids_qsmnet.inference.refine import refine_grid

    chi, field, mask = _piecewise()
    prior = 0.6 * chi
    rho0, chis, residuals = refine_grid(prior, field, mask, [0.01, 0.1], tv=tv,
                                        tv_iterations=20)
    assert rho0 == pytest.approx(data_residual(prior, field, mask.astype(float)), abs=1e-6)
    for lam, x, r in zip([0.01, 0.1], chis, residuals):
        want, report = refine_adaptive(prior, field, mask,
                                       DCSettings(lam, 30, tv=tv, tv_iterations=20))
        # (a single plain λ may be solved by PCG, the grid by shifted CG: to 1e-3 of the map)
        tol = 1e-6 if tv else 1e-3 * np.abs(want).max()
        assert np.abs(x - want).max() < tol and r == pytest.approx(report["residual"], abs=1e-3)
    assert residuals[0] < residuals[1] < rho0  # more trust in the field, less left of it
