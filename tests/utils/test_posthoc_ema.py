"""Post-hoc EMA math (EDM2): σ_rel <-> γ, the power-function β, the exact weights of a tracked
EMA, the least-squares reconstruction, snapshot files."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from ddpm.utils.posthoc_ema import (
    MAX_SIGMA_REL,
    check_sigma_rel,
    combine,
    gamma_to_sigma_rel,
    power_ema_beta,
    power_ema_weights,
    read_snapshot,
    reconstruct,
    sigma_rel_to_gamma,
    solve_coefficients,
    write_snapshot,
)


def tracked(thetas: torch.Tensor, gamma: float, upto: int) -> torch.Tensor:
    """An EMA updated with β_γ(t) over the first ``upto`` rows of ``thetas`` (float64)."""
    ema = torch.zeros(thetas.shape[1], dtype=torch.float64)
    for t in range(1, upto + 1):
        beta = power_ema_beta(gamma, t)
        ema = beta * ema + (1.0 - beta) * thetas[t - 1]
    return ema


def test_sigma_rel_and_gamma_are_eq_3_both_ways() -> None:
    # EDM2 sec. 3.1: σ_rel 0.05 and 0.10 are γ = 16.97 and 6.94
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.005)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.005)
    for s in (0.01, 0.07, 0.2, MAX_SIGMA_REL):
        g = sigma_rel_to_gamma(s)
        assert gamma_to_sigma_rel(g) == pytest.approx(s, rel=1e-12)
        assert (g + 1) / ((g + 2) ** 2 * (g + 3)) == pytest.approx(s**2, rel=1e-12)
    assert sigma_rel_to_gamma(MAX_SIGMA_REL) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("bad", [0, -0.1, 0.3, math.nan, "0.1", True, None])
def test_sigma_rel_out_of_range_is_refused_with_its_name(bad: object) -> None:
    with pytest.raises(ValueError, match=r"sigma_rel must be .*0\.2887"):
        check_sigma_rel(bad)  # type: ignore[arg-type]


def test_weights_are_the_telescoped_betas() -> None:
    g, T = sigma_rel_to_gamma(0.1), 60
    assert power_ema_beta(g, 1) == 0.0  # the first update copies
    thetas = torch.eye(T, dtype=torch.float64)  # θ_s = e_s: the EMA is its weight vector
    w = power_ema_weights(g, T)
    torch.testing.assert_close(tracked(thetas, g, T), w, atol=1e-14, rtol=0)
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-14)
    assert torch.all(w[1:] >= w[:-1])  # recent steps weigh more (γ > 0)
    # a block past t is zero; a block that starts later is the same function
    torch.testing.assert_close(power_ema_weights(g, T, 70)[:T], w)
    assert torch.all(power_ema_weights(g, T, 70)[T:] == 0)
    torch.testing.assert_close(power_ema_weights(g, T, 10, start=21), w[20:30])
    # large γ and t do not overflow (s^(γ+1) would)
    assert torch.isfinite(power_ema_weights(sigma_rel_to_gamma(0.005), 10**5)).all()


def test_a_tracked_profile_is_reconstructed_exactly_from_snapshots_of_two() -> None:
    """The target (σ_rel 0.10 at step 40) is one of the 16 snapshots: the least-squares solution
    picks it and the combined weights equal the EMA tracked step by step."""
    torch.manual_seed(0)
    T, every = 80, 10
    thetas = torch.randn(T, 5, dtype=torch.float64).cumsum(0)  # a random walk of weights
    gammas = [sigma_rel_to_gamma(0.05), sigma_rel_to_gamma(0.10)]
    profiles = [(g, t) for t in range(every, T + 1, every) for g in gammas]
    states = [{"w": tracked(thetas, g, t)} for g, t in profiles]
    c, error = solve_coefficients(profiles, (gammas[1], 40))
    assert error < 1e-6
    got = combine(states, c)["w"]
    torch.testing.assert_close(got, tracked(thetas, gammas[1], 40), atol=1e-9, rtol=0)


def test_a_length_between_the_tracked_ones_is_approximated_closely() -> None:
    """σ_rel 0.07 from profiles 0.05 / 0.10: the fit error shrinks with more snapshots and the
    weights are far closer to the true 0.07 EMA than either tracked profile is."""
    torch.manual_seed(1)
    T = 400
    thetas = torch.randn(T, 3, dtype=torch.float64).cumsum(0)
    gammas = [sigma_rel_to_gamma(0.05), sigma_rel_to_gamma(0.10)]
    target = (sigma_rel_to_gamma(0.07), T)
    errors = []
    for every in (100, 25):
        profiles = [(g, t) for t in range(every, T + 1, every) for g in gammas]
        c, err = solve_coefficients(profiles, target)
        errors.append(err)
    assert errors[1] < errors[0] < 0.05
    states = [{"w": tracked(thetas, g, t)} for g, t in profiles]
    truth = tracked(thetas, target[0], T)
    got = combine(states, c)["w"]
    nearest = min((tracked(thetas, g, T) - truth).norm() for g in gammas)
    assert (got - truth).norm() < 0.1 * nearest


def test_combine_keeps_dtypes_and_integer_buffers() -> None:
    a = {"w": torch.ones(2), "n": torch.tensor(3)}
    b = {"w": torch.full((2,), 3.0), "n": torch.tensor(5)}
    out = combine([a, b], torch.tensor([0.25, 0.75], dtype=torch.float64))
    assert out["w"].dtype == torch.float32 and torch.equal(out["w"], torch.full((2,), 2.5))
    assert out["n"].item() == 5
    with pytest.raises(ValueError, match="2 states but 1 coefficients"):
        combine([a, b], torch.ones(1))


def test_snapshot_files_and_reconstruct_from_a_record(tmp_path: Path) -> None:
    """A record (snapshot files + live profiles) reconstructs the tracked profile at its end;
    the snapshot at the record's own step is not read twice."""
    torch.manual_seed(2)
    sigma_rels, T = [0.05, 0.10], 30
    gammas = [sigma_rel_to_gamma(s) for s in sigma_rels]
    thetas = torch.randn(T, 4, dtype=torch.float64).cumsum(0)

    def state(g: float, t: int) -> dict[str, torch.Tensor]:
        return {"w": tracked(thetas, g, t).float(), "count": torch.tensor(t)}

    snapshots = []
    for t in (10, 20, 30):
        write_snapshot(
            tmp_path / f"s{t}.safetensors",
            [state(g, t) for g in gammas],
            sigma_rels,
            step=t,
            num_updates=t,
        )
        snapshots.append({"file": f"s{t}.safetensors", "step": t, "num_updates": t})
    profiles, info = read_snapshot(tmp_path / "s20.safetensors")
    assert info == {"step": 20, "num_updates": 20, "sigma_rels": sigma_rels}
    assert torch.equal(profiles[1]["w"], state(gammas[1], 20)["w"])
    record = {
        "sigma_rels": sigma_rels,
        "num_updates": T,
        "profiles": [state(g, T) for g in gammas],
        "snapshots": snapshots,
    }
    weights, error = reconstruct(record, tmp_path, 0.05)
    assert error < 1e-6 and weights["count"].item() == T
    torch.testing.assert_close(weights["w"], state(gammas[0], T)["w"], atol=1e-5, rtol=0)
    # a record whose file says another step is refused
    bad = {**record, "snapshots": [{**snapshots[0], "num_updates": 11}]}
    with pytest.raises(ValueError, match="holds update 10, its record says 11"):
        reconstruct(bad, tmp_path, 0.07)
