"""ex19: dpo_forward and dpo_backward (sigmoid, cDPO label smoothing, IPO)."""
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from llama3np.exercises.testing import assert_close, check_gradient, load_fixture, numeric_grad
from llama3np.posttrain import losses

FX = load_fixture("ex19")
CASES = FX.meta["config"]["cases"]
X = [FX["pc"], FX["pr"], FX["rc"], FX["rr"]]


def _case(name):
    loss, cache = losses.dpo_forward(*X, **CASES[name])
    assert_close(loss, FX[f"{name}.loss"], f"{name}: loss")
    dc, dr = losses.dpo_backward(0.5, cache)
    assert_close(dc, FX[f"{name}.dchosen"], f"{name}: d policy_chosen_logps")
    assert_close(dr, FX[f"{name}.drejected"], f"{name}: d policy_rejected_logps")


def test_sigmoid_loss_matches_the_reference():
    """DPO's sigmoid loss (beta 0.1) and its gradients equal the reference."""
    _case("sigmoid")


def test_label_smoothing_matches_the_reference():
    """cDPO (beta 0.5, label smoothing 0.2) equals the reference."""
    _case("cdpo")


def test_ipo_matches_the_reference():
    """IPO's squared loss (beta 0.3) equals the reference."""
    _case("ipo")


@given(st.sampled_from(["sigmoid", "cdpo", "ipo"]), st.integers(0, 2**31 - 1))
def test_gradients_match_finite_differences(name, seed):
    """Both gradients match central differences of the mean loss (the loss from its definition)."""
    rng = np.random.default_rng(seed)
    x = [rng.standard_normal(4) * 2 for _ in range(4)]
    kw = CASES[name]
    beta, ls = kw["beta"], kw.get("label_smoothing", 0.0)

    def loss(pc, pr):
        d = (pc - x[2]) - (pr - x[3])
        if kw.get("loss_type") == "ipo":
            return float(np.mean((d - 1 / (2 * beta)) ** 2))
        return float(np.mean((1 - ls) * np.logaddexp(0, -beta * d) + ls * np.logaddexp(0, beta * d)))

    _, cache = losses.dpo_forward(*x, **kw)
    dc, dr = losses.dpo_backward(1.0, cache)
    check_gradient("dchosen", dc, numeric_grad(lambda v: loss(v, x[1]), x[0]), exercise="ex19")
    check_gradient("drejected", dr, numeric_grad(lambda v: loss(x[0], v), x[1]), exercise="ex19")
