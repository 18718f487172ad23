"""ex20: gae_loop, generalized advantage estimation backwards in time."""
import numpy as np

from llama3np.exercises.testing import assert_close, load_fixture
from llama3np.posttrain.losses import gae_loop

FX = load_fixture("ex20")
CASES = FX.meta["config"]["cases"]


def test_matches_the_reference_for_three_settings():
    """Advantages and returns for (gamma, lambda) = (1, .95), (.9, .8), (.99, 0) with masked rows equal the reference."""
    for name, (gamma, lam) in CASES.items():
        adv, ret = gae_loop(FX["rewards"], FX["values"], FX["mask"], gamma, lam)
        assert_close(adv, FX[f"{name}.adv"], f"{name}: advantages")
        assert_close(ret, FX[f"{name}.ret"], f"{name}: returns")


def test_lambda_one_is_the_monte_carlo_return_minus_the_value():
    """gamma = lambda = 1 on a full row: A_t = sum of rewards from t on, minus V_t."""
    rng = np.random.default_rng(0)
    r, v = rng.standard_normal((1, 5)), rng.standard_normal((1, 5))
    adv, _ = gae_loop(r, v, np.ones((1, 5)), 1.0, 1.0)
    assert_close(adv, np.cumsum(r[:, ::-1], axis=1)[:, ::-1] - v, "advantages with lambda = 1", rtol=1e-12)
