"""Context extension against the reference implementations: crope's yarn and llama3 frequencies equal
the inverse frequencies and attention factor that Hugging Face transformers computes, which its users
(and vLLM, which follows the same equations) meet.

The literals were generated once with transformers 5.24.0, for each case (d, base, s, L):

    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import _compute_yarn_parameters, _compute_llama3_parameters
    config = LlamaConfig(hidden_size=4 * d, num_attention_heads=4, head_dim=d, max_position_embeddings=int(s * L),
                         rope_parameters={"rope_type": "yarn", "rope_theta": base, "factor": s,
                                          "original_max_position_embeddings": L})
    inv_freq, attention_factor = _compute_yarn_parameters(config)

and for llama3 the same with rope_parameters {"rope_type": "llama3", ..., "low_freq_factor": 1.0,
"high_freq_factor": 4.0} and _compute_llama3_parameters; inv_freq printed with 9 significant digits.
transformers computes in float32, crope in float64: they agree to 3e-7 relative.
"""

import math

import pytest
import torch

from crope import ROPE_FREQUENCIES, GPT, GPTConfig, llama3_frequencies, model_rotary_tables

# ((head size d, base, factor s, trained context L), attention factor, inverse frequencies)
YARN_REFERENCE = [
    # the short contexts crope trains at: the fastest pair is kept (1.0), the rest ramp in the pair index
    ((32, 10000, 4, 64), 1.138629436111989,
        [1, 0.477990121, 0.221359432, 0.0978053659, 0.0399999991, 0.0140585322, 0.00790569466, 0.00444569858,
         0.00249999994, 0.00140585331, 0.000790569466, 0.000444569858, 0.000250000012, 0.000140585325,
         7.90569466e-05, 4.44569851e-05]),
    ((32, 10000, 2, 128), 1.0693147180559945,
        [1, 0.515479565, 0.263523132, 0.133370951, 0.0666666627, 0.0328032412, 0.0158113893, 0.00889139716,
         0.00499999989, 0.00281170662, 0.00158113893, 0.000889139716, 0.000500000024, 0.000281170651,
         0.000158113893, 8.89139701e-05]),
    ((8, 10000, 8, 64), 1.2079441541679836,
        [1, 0.0562500022, 0.00124999997, 0.000125000006]),
    ((16, 500000, 4, 128), 1.138629436111989,
        [1, 0.121201724, 0.00940150768, 0.00182316627, 0.000353553361, 6.85620471e-05, 1.32957393e-05,
         2.57834631e-06]),
    ((64, 10000, 16, 4096), 1.2772588722239782,
        [1, 0.749894202, 0.562341332, 0.421696514, 0.316227764, 0.237137362, 0.177827939, 0.133352146, 0.100000001,
         0.0749894157, 0.0562341288, 0.039128568, 0.0270618014, 0.0185833592, 0.0126531422, 0.00852684397,
         0.00567307696, 0.00371341826, 0.00237913639, 0.00147999241, 0.000881788961, 0.000490235921,
         0.000239383779, 8.33450904e-05, 6.2500003e-05, 4.68683866e-05, 3.51463314e-05, 2.63560305e-05,
         1.97642366e-05, 1.48210866e-05, 1.11142463e-05, 8.3345094e-06]),
    ((16, 10000, 1.5, 64), 1.0405465108108165,
        [1, 0.281091332, 0.0777777806, 0.0210818499, 0.00666666683, 0.00210818532, 0.00066666666, 0.000210818514]),
    # a long context: the ramp ends at pair 5, past the last pair 3 (the reference clamps at d - 1)
    ((8, 10000, 4, 131072), 1.138629436111989,
        [1, 0.100000001, 0.00999999978, 0.000750000007]),
    # a tiny context: both ends of the ramp clamp to pair 0, where the reference widens it by 0.001
    ((8, 10000, 2, 4), 1.0693147180559945,
        [1, 0.0500000007, 0.00499999989, 0.000500000024]),
]
LLAMA3_REFERENCE = [
    ((32, 10000, 4, 64), 1.0,
        [1, 0.562341332, 0.254647911, 0.0805267394, 0.0254647899, 0.0140585322, 0.00790569466, 0.00444569858,
         0.00249999994, 0.00140585331, 0.000790569466, 0.000444569858, 0.000250000012, 0.000140585325,
         7.90569466e-05, 4.44569851e-05]),
    ((32, 10000, 8, 128), 1.0,
        [1, 0.562341332, 0.316227764, 0.158257738, 0.0427511781, 0.00941721443, 0.00395284733, 0.00222284929,
         0.00124999997, 0.000702926656, 0.000395284733, 0.000222284929, 0.000125000006, 7.02926627e-05,
         3.95284733e-05, 2.22284925e-05]),
    ((8, 10000, 2, 64), 1.0,
        [1, 0.0503098592, 0.00499999989, 0.000500000024]),
    ((16, 500000, 8, 8192), 1.0,
        [1, 0.193922758, 0.0376060307, 0.00729266508, 0.000524846022, 3.42810235e-05, 6.64786967e-06,
         1.28917316e-06]),
    ((64, 500000, 8, 8192), 1.0,
        [1, 0.663601279, 0.440366626, 0.292227834, 0.193922758, 0.128687382, 0.0853971019, 0.0566696189,
         0.0376060307, 0.0249554086, 0.0165604409, 0.0109895291, 0.00729266508, 0.00483942125, 0.00321144611,
         0.00137189368, 0.000524846022, 0.000178507791, 7.78465546e-05, 5.16590699e-05, 3.42810235e-05,
         2.2748929e-05, 1.50962178e-05, 1.00178686e-05, 6.64786967e-06, 4.41153452e-06, 2.92749974e-06,
         1.94269251e-06, 1.28917316e-06, 8.55496921e-07, 5.6770881e-07, 3.7673226e-07]),
]


@pytest.mark.parametrize("method, case, attention_factor, reference",
                         [("yarn", *case) for case in YARN_REFERENCE] + [("llama3", *case) for case in LLAMA3_REFERENCE],
                         ids=lambda v: str(v))
def test_frequencies_and_attention_factor_equal_the_reference(method, case, attention_factor, reference):
    head_size, base, s, trained = case
    theta = ROPE_FREQUENCIES[method](head_size, base, s, trained)
    torch.testing.assert_close(theta, torch.tensor(reference, dtype=torch.float64), rtol=1e-6, atol=0)
    config = GPTConfig(vocab_size=50, block_size=int(s * trained), trained_block_size=trained, n_layer=1, n_head=1,
                       n_embd=head_size, rope_base=base, rope_scaling=method)
    cos, _ = model_rotary_tables(config)
    assert cos[0, 0].item() == pytest.approx(attention_factor, rel=1e-6, abs=0)   # cos 0 = 1, times the factor


@pytest.mark.parametrize("method, reference", [("yarn", YARN_REFERENCE[0]), ("llama3", LLAMA3_REFERENCE[0])])
def test_an_extended_model_rotates_by_the_reference_frequencies(method, reference):
    (head_size, base, s, trained), attention_factor, theta = reference
    model = GPT(GPTConfig(vocab_size=50, block_size=trained, n_layer=1, n_head=1, n_embd=head_size, pos="crope",
                          rope_base=base))
    extended = model.extend_context(int(s * trained), method)
    angles = torch.arange(int(s * trained), dtype=torch.float64)[:, None] * torch.tensor(theta, dtype=torch.float64)
    # the reference's float32 rounding (3e-7 relative) times positions up to 255, and float32 tables
    torch.testing.assert_close(extended.rope_cos.double(), attention_factor * angles.cos(), rtol=0, atol=5e-6)
    torch.testing.assert_close(extended.rope_sin.double(), attention_factor * angles.sin(), rtol=0, atol=5e-6)


def test_llama3_is_a_ramp_in_turns_between_one_and_four():
    theta = 10000.0 ** (-torch.arange(0, 32, 2, dtype=torch.float64) / 32)
    turns = 64 * theta / (2 * math.pi)          # over the trained context of 64
    scaled = llama3_frequencies(32, 10000.0, 4, 64)
    torch.testing.assert_close(scaled[turns >= 4], theta[turns >= 4], rtol=0, atol=0)            # kept
    torch.testing.assert_close(scaled[turns <= 1], theta[turns <= 1] / 4, rtol=1e-15, atol=0)    # interpolated
    middle = (turns > 1) & (turns < 4)
    assert middle.sum() == 3 and ((scaled[middle] < theta[middle]) & (scaled[middle] > theta[middle] / 4)).all()
