"""ModelArgs refuses values that would only show up later as a NaN loss or a crash deep in a forward."""
import math

import pytest

from llama3np.args import LLAMA3_VOCAB_SIZE, PRESETS, ModelArgs, preset


@pytest.mark.parametrize("field, value", [
    ("rope_theta", math.nan), ("rope_theta", math.inf), ("rope_theta", 0.0), ("rope_theta", -10000.0),
    ("norm_eps", 0.0), ("norm_eps", math.nan), ("norm_eps", -1e-5),
    ("ffn_dim_multiplier", math.nan), ("ffn_dim_multiplier", 0.0),
    ("rope_scale_factor", math.inf), ("rope_low_freq_factor", 0.0), ("multiple_of", 0),
    ("rope_original_max_seq_len", -1), ("max_seq_len", 2.5), ("hidden_dim", 0), ("hidden_dim", 64.0),
    ("tie_embeddings", 1), ("use_scaled_rope", "yes"), ("rope_theta", True),
])
def test_non_finite_and_out_of_range_values_are_refused_with_their_name(field, value):
    with pytest.raises(ValueError, match=field):
        preset("tiny", **{field: value})


def test_scaled_rope_needs_the_high_frequency_factor_above_the_low_one():
    with pytest.raises(ValueError, match="rope_high_freq_factor"):
        ModelArgs(use_scaled_rope=True, rope_low_freq_factor=4.0, rope_high_freq_factor=4.0)


def test_every_preset_and_integer_valued_floats_are_accepted():
    for name in PRESETS:
        preset(name)
    assert preset("tiny", rope_theta=10000, norm_eps=1e-6).rope_theta == 10000  # JSON may give ints
    assert ModelArgs().vocab_size == LLAMA3_VOCAB_SIZE == 128256
