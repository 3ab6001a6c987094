"The scaling module as `tinyllama-sweep` imports it, without the notebook's globals: the fit and the compute-optimal split."
import numpy as np
import pandas as pd

from tinyllama.scaling import compute_optimal, fit_law, predict


def test_fit_law_recovers_a_known_law_from_pandas_columns():
    law = {"E": 1.5, "A": 300.0, "B": 700.0, "alpha": 0.4, "beta": 0.35}
    n, d = (g.ravel() for g in np.meshgrid(np.geomspace(2e5, 3e6, 4), np.geomspace(5e5, 5e6, 4)))
    points = pd.DataFrame({"N": n, "D": d, "L": [predict(law, a, b) for a, b in zip(n, d)]})
    fitted = fit_law(points.N, points.D, points.L)  # read-only Series, as scaling_points gives them
    assert all(abs(fitted[k] / v - 1) < 1e-3 for k, v in law.items())


def test_compute_optimal_is_the_isoflop_minimum():
    law = {"E": 1.5, "A": 300.0, "B": 700.0, "alpha": 0.4, "beta": 0.35}
    C = 1e14
    n_grid = np.geomspace(1e4, 1e9, 20001)
    brute = n_grid[np.argmin([predict(law, n, C / (6 * n)) for n in n_grid])]
    n_opt, d_opt = compute_optimal(law, C)
    assert abs(n_opt / brute - 1) < 1e-3 and abs(6 * n_opt * d_opt / C - 1) < 1e-12

