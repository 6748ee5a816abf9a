"""RoPE: frequencies bit-identical to the Hugging Face reference, the paper's settings, and
angles that stay exact at 4M positions."""
import copy
import math

import pytest
import torch

import rope
from rope import RopeSettings

transformers = pytest.importorskip("transformers")


def hf_reference(fields: dict, head_dim: int = 64):
    """inv_freq and attention scaling from transformers' own rope functions, for config.json fields."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    config = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim, **fields)
    kind = config.rope_parameters["rope_type"]
    if kind == "default":
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
        return LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    return ROPE_INIT_FUNCTIONS[kind](config, "cpu")


def hf_inv_freq(settings: RopeSettings, head_dim: int, max_pos: int):
    return hf_reference({**rope.to_hf(settings, head_dim), "max_position_embeddings": max_pos}, head_dim)


LLAMA31 = RopeSettings(theta=500000.0, kind="llama3", factor=8.0, original_max_position=8192)


@pytest.mark.parametrize("ctx", ["1M", "2M", "4M"])
def test_paper_yarn_settings_match_reference_bit_for_bit(ctx):
    window = rope.parse_size(ctx)
    s = rope.extend_settings(LLAMA31, window)
    assert s.kind == "yarn" and s.beta_fast == 4.0 and s.beta_slow == 1.0 and s.theta == 500000.0
    assert s.factor == {"1M": 128, "2M": 256, "4M": 512}[ctx]
    assert s.mscale == pytest.approx({"1M": 1.4852, "2M": 1.5545, "4M": 1.6238}[ctx], abs=1e-4)
    ref, ref_scale = hf_inv_freq(s, 128, window)
    assert torch.equal(rope.inv_freq(s, 128), ref)
    assert s.mscale == pytest.approx(ref_scale, rel=1e-12)


def test_yarn_frequencies_follow_the_formula():
    """The ramp as the recipe states it, written out independently in float64."""
    s = rope.extend_settings(LLAMA31, rope.parse_size("4M"))
    d, base, L = 128, 500000.0, 8192

    def correction_dim(r):
        return d * math.log(L / (2 * math.pi * r)) / (2 * math.log(base))
    low, high = math.floor(correction_dim(4)), math.ceil(correction_dim(1))
    ours = rope.inv_freq(s, d)
    for i in range(d // 2):
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)
        expected = base ** (-2 * i / d) * ((1 - ramp) + ramp / 512)
        assert ours[i].item() == pytest.approx(expected, rel=1e-6)
    assert ours[0].item() == pytest.approx(1.0)  # the fastest dimension is untouched
    assert ours[-1].item() == pytest.approx(base ** (-(d - 2) / d) / 512, rel=1e-6)  # the slowest divided by s


@pytest.mark.parametrize("settings", [
    RopeSettings(theta=500000.0),
    LLAMA31,
    RopeSettings(theta=10000.0, kind="yarn", factor=8.0, original_max_position=512, beta_fast=32, beta_slow=1),
    RopeSettings(theta=10000.0, kind="yarn", factor=16.0, original_max_position=256, attention_factor=1.2),
])
def test_inv_freq_bit_identical_to_transformers(settings):
    ref, scale = hf_inv_freq(settings, 64, int(settings.original_max_position * settings.factor))
    assert torch.equal(rope.inv_freq(settings, 64), ref)
    assert settings.mscale == pytest.approx(scale)


def test_ntk_is_plain_rope_with_a_larger_base():
    s = RopeSettings(theta=10000.0, kind="ntk", factor=16.0, original_max_position=256)
    theta = rope.to_hf(s, 64)["rope_theta"]
    assert theta == pytest.approx(10000.0 * 16 ** (64 / 62))
    assert torch.equal(rope.inv_freq(s, 64), rope.default_inv_freq(theta, 64))


@pytest.mark.parametrize("settings", [RopeSettings(theta=1e4), LLAMA31, rope.extend_settings(LLAMA31, 1 << 22)])
def test_hf_dict_round_trip(settings):
    fields = rope.to_hf(settings, 128)
    back = rope.from_hf({**fields, "max_position_embeddings": 1 << 22})
    assert rope.inv_freq(back, 128).equal(rope.inv_freq(settings, 128))
    assert back.mscale == settings.mscale
    if settings.kind == "yarn":  # every field spelled out, nothing left to engine defaults
        assert set(fields["rope_scaling"]) >= {"rope_type", "factor", "original_max_position_embeddings",
                                               "beta_fast", "beta_slow", "attention_factor"}


def test_cos_sin_exact_near_4M():
    """At positions near 4M the angle must be exact: compare with Python's float64 math on the
    exactly representable product, and show that a plain fp32 computation is far off."""
    s = rope.extend_settings(LLAMA31, 1 << 22)
    freqs = rope.inv_freq(s, 128)
    positions = torch.tensor([[4194303, 4194302, 4000037, 3 * 2**20 + 12345, 2**21 + 1]])
    cos, sin = rope.rope_cos_sin(positions, freqs, mscale=1.0)  # (1, 5, 128) fp32
    worst, worst_fp32 = 0.0, 0.0
    for t, p in enumerate(positions[0].tolist()):
        for i in range(64):
            angle = p * float(freqs[i])  # 22-bit integer x 24-bit mantissa: exact in float64
            worst = max(worst, abs(cos[0, t, i].item() - math.cos(angle)), abs(sin[0, t, i].item() - math.sin(angle)))
            fp32_angle = (torch.tensor(float(p)) * freqs[i]).item()
            worst_fp32 = max(worst_fp32, abs(math.cos(fp32_angle) - math.cos(angle)))
    assert worst < 1e-6
    assert worst_fp32 > 1e-2  # the failure this guards against is real


def test_cos_sin_for_arbitrary_positions_equals_a_gathered_table():
    freqs = rope.inv_freq(RopeSettings(theta=1e4), 32)
    table_cos, table_sin = rope.rope_cos_sin(torch.arange(64)[None], freqs)
    positions = torch.tensor([[0, 1, 6, 7], [60, 3, 3, 9]])  # a zigzag shard; a packed batch
    cos, sin = rope.rope_cos_sin(positions, freqs)
    assert torch.equal(cos, table_cos[0][positions]) and torch.equal(sin, table_sin[0][positions])


def test_bad_settings_are_refused_with_a_sentence():
    with pytest.raises(rope.UserError, match="unknown rope type"):
        RopeSettings(kind="linearish")
    with pytest.raises(rope.UserError, match="unsupported rope type 'dynamic'"):
        rope.from_hf({"rope_theta": 1e4, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}})
    with pytest.raises(rope.UserError, match="K, M or G"):
        rope.parse_size("4Q")
    assert rope.parse_size("4M") == 4194304 and rope.parse_size("128K") == 131072 and rope.parse_size("512") == 512


# ------------------------------------------------------------------------------------------------
# config.json as checkpoints write it: every field present, optional ones omitted (transformers'
# defaults), gpt-oss's "truncate": false and DeepSeek's mscale / mscale_all_dim; bit for bit

YARN = {"rope_type": "yarn", "factor": 64.0, "original_max_position_embeddings": 4096, "beta_fast": 8.0,
        "beta_slow": 2.0, "attention_factor": 1.25, "truncate": False}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192, "low_freq_factor": 2.0,
          "high_freq_factor": 8.0}


def config_with(scaling: dict, omit=(), **changes) -> dict:
    scaling = {k: v for k, v in {**scaling, **changes}.items() if k not in omit}
    return {"rope_theta": 500000.0, "max_position_embeddings": 1 << 18, "rope_scaling": scaling}


CASES = {
    "yarn, every field": config_with(YARN),
    **{f"yarn without {name}": config_with(YARN, omit=[name]) for name in (
        "beta_fast", "beta_slow", "attention_factor", "truncate", "original_max_position_embeddings")},
    "yarn, only the required fields": config_with(YARN, omit=["beta_fast", "beta_slow", "attention_factor", "truncate"]),
    "yarn factor null": config_with(YARN, factor=None),  # transformers derives it: 2^18 / 4096 = 64
    "yarn factor null, no attention_factor": config_with(YARN, factor=None, omit=["attention_factor"]),
    "yarn truncate true": config_with(YARN, truncate=True),
    "DeepSeek mscale 1/0.5": config_with(YARN, omit=["attention_factor"], mscale=1.0, mscale_all_dim=0.5),
    "DeepSeek mscale 0.707/0.707": config_with(YARN, omit=["attention_factor"], mscale=0.707, mscale_all_dim=0.707),
    "mscale alone is unused": config_with(YARN, omit=["attention_factor"], mscale=1.0),
    "attention_factor wins over mscale": config_with(YARN, mscale=1.0, mscale_all_dim=0.5),
    "yarn, transformers 5": {"rope_parameters": {"rope_theta": 1e4, **YARN}, "max_position_embeddings": 1 << 18},
    "llama3, every field": config_with(LLAMA3),
    "llama3 without original window": config_with(LLAMA3, omit=["original_max_position_embeddings"]),
    "llama3, transformers 5": {"rope_parameters": {"rope_theta": 5e5, **LLAMA3}, "max_position_embeddings": 1 << 17},
    "default": {"rope_theta": 500000.0, "rope_scaling": None},
    "default, whole heads": {"rope_theta": 1e4, "rope_scaling": {"rope_type": "default"}, "partial_rotary_factor": 1},
}


@pytest.mark.parametrize("config", CASES.values(), ids=CASES.keys())
def test_config_fields_present_or_omitted_give_transformers_numbers_bit_for_bit(config):
    ours = rope.from_hf(copy.deepcopy(config))
    ref, ref_scale = hf_reference(copy.deepcopy(config), 128)  # (transformers edits the dicts it is given)
    assert torch.equal(rope.inv_freq(ours, 128), ref)
    assert ours.mscale == ref_scale
    again = rope.from_hf({**rope.to_hf(ours, 128), "max_position_embeddings": 1})  # the export: nothing implicit
    assert torch.equal(rope.inv_freq(again, 128), ref) and again.mscale == ref_scale


def test_truncate_false_and_deepseek_mscale_change_the_numbers():
    """The cases above would pass vacuously if these fields did nothing."""
    base = rope.from_hf(config_with(YARN, omit=["attention_factor"]))
    truncated = rope.from_hf(config_with(YARN, truncate=True))
    assert not torch.equal(rope.inv_freq(truncated, 128), rope.inv_freq(base, 128))
    deepseek = rope.from_hf(config_with(YARN, omit=["attention_factor"], mscale=1.0, mscale_all_dim=0.5))
    assert deepseek.mscale != base.mscale


@pytest.mark.parametrize("field", ["factor", "low_freq_factor", "high_freq_factor"])
def test_llama3_without_a_field_transformers_requires_is_refused_by_name(field):
    with pytest.raises(KeyError):  # transformers has no default either
        hf_reference(config_with(LLAMA3, omit=[field]))
    with pytest.raises(rope.UserError, match=f"ckpt/config.json lacks rope field '{field}'"):
        rope.from_hf(config_with(LLAMA3, omit=[field]), "ckpt/config.json")


@pytest.mark.parametrize("config, field", [
    (config_with(YARN, finetuned=True), "'finetuned' of rope type 'yarn'"),
    (config_with(LLAMA3, beta_fast=4.0), "'beta_fast' of rope type 'llama3'"),
    (config_with(YARN, partial_rotary_factor=0.5), "'partial_rotary_factor' of rope type 'yarn'"),
    ({"rope_theta": 1e4, "rope_scaling": {"rope_type": "default", "factor": 2.0}}, "'factor' of rope type 'default'"),
])
def test_a_field_that_would_change_the_math_is_refused_by_name(config, field):
    with pytest.raises(rope.UserError, match=f"field {field} in ckpt/config.json is not supported"):
        rope.from_hf(config, "ckpt/config.json")
