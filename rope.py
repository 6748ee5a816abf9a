"""RoPE and its scalings to longer windows: default, llama3 (Llama 3.1's own, 8x), yarn (Peng et al. 2023: the
recipe's), ntk (theta * s^(d/(d-2)): an ablation). Exact at 4M tokens: inv_freq is fp32, bit-identical to
transformers'; position * inv_freq in float64 is exact (24-bit mantissa x position < 2^29; fp32 rounds the angle at
4,194,303 to a multiple of 0.25 rad); cos/sin exist only for the positions a rank holds (4M x 128: 2 GiB)."""
import math
from dataclasses import dataclass

import torch

_SCALED = {"rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings"}
HF_FIELDS = {"default": {"rope_type", "type", "rope_theta"},  # the config fields implemented here, by rope type
             "llama3": _SCALED | {"low_freq_factor", "high_freq_factor"},
             "yarn": _SCALED | {"beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate"}}

class UserError(ValueError):
    """A user's mistake (a flag, file, line or config field), printed as one sentence, no traceback."""

@dataclass
class RopeSettings:
    theta: float = 500000.0
    kind: str = "default"  # default, llama3, yarn or ntk
    factor: float = 1.0  # s: how many times longer the new window is than original_max_position
    original_max_position: int = 8192  # the window the frequencies were trained for (L)
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    beta_fast: float = 32.0  # yarn only, as the three below; the paper's beta = 4 (32: transformers' default)
    beta_slow: float = 1.0  # the paper's alpha
    attention_factor: float | None = None  # None -> 0.1 ln(s) + 1 (YaRN's temperature)
    truncate: bool = True  # round the ramp's ends to whole dimensions (gpt-oss checkpoints: false)

    def __post_init__(self):
        if self.kind not in ("default", "llama3", "yarn", "ntk"):
            raise UserError(f"unknown rope type {self.kind!r}; expected one of default, llama3, yarn, ntk")
        if self.kind != "default" and self.factor < 1.0:
            raise UserError(f"rope scaling factor must be >= 1, got {self.factor}")

    @property
    def mscale(self) -> float:  # the attention factor: multiplies both cos and sin (q.k is scaled by its square)
        yarn = yarn_mscale(self.factor) if self.attention_factor is None else float(self.attention_factor)
        return yarn if self.kind == "yarn" else 1.0

def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0  # YaRN's sqrt(1/t) (DeepSeek: x mscale)

def default_inv_freq(theta: float, head_dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))  # (d/2,)

def llama3_inv_freq(s: RopeSettings, head_dim: int) -> torch.Tensor:
    """Llama 3.1: long wavelengths divided by factor, short ones kept, a smooth blend between."""
    inv_freq, L = default_inv_freq(s.theta, head_dim), s.original_max_position
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > L / s.low_freq_factor, inv_freq / s.factor, inv_freq)
    smooth = (L / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = ~(wavelen < L / s.high_freq_factor) * ~(wavelen > L / s.low_freq_factor)
    return torch.where(is_medium, smoothed, scaled)

def yarn_inv_freq(s: RopeSettings, head_dim: int) -> torch.Tensor:
    """Dimensions rotating more than beta_fast times in the original window keep their frequency (keep = 1:
    they see only local order), those rotating fewer than beta_slow times are divided by s (keep = 0)."""
    def correction_dim(rotations: float) -> float:  # the dimension rotating `rotations` times in L
        return head_dim * math.log(s.original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(s.theta))
    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    low, high = (math.floor(low), math.ceil(high)) if s.truncate else (low, high)
    low, high = max(low, 0), min(high, head_dim - 1)
    high += 0.001 if low == high else 0  # a one-dimension ramp would divide by zero
    pos_freqs = s.theta ** (torch.arange(0, head_dim, 2).float() / head_dim)  # (d/2,)
    keep = 1 - torch.clamp((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)  # a ramp
    return 1.0 / (s.factor * pos_freqs) * (1 - keep) + 1.0 / pos_freqs * keep

def ntk_theta(s: RopeSettings, head_dim: int) -> float:
    return s.theta * s.factor ** (head_dim / (head_dim - 2))  # NTK-aware: slowest wavelength x s, fastest barely

def inv_freq(s: RopeSettings, head_dim: int) -> torch.Tensor:  # (d/2,) fp32: transformers' operations, in its order
    if s.kind in ("llama3", "yarn"):
        return llama3_inv_freq(s, head_dim) if s.kind == "llama3" else yarn_inv_freq(s, head_dim)
    return default_inv_freq(ntk_theta(s, head_dim) if s.kind == "ntk" else s.theta, head_dim)

def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, mscale: float = 1.0, dtype=torch.float32):
    """cos, sin (*positions.shape, d) of the global positions held times inv_freq; mscale multiplies both."""
    angles = positions.to(torch.float64)[..., None] * inv_freq.to(positions.device, torch.float64)  # (..., d/2)
    angles = torch.cat((angles, angles), dim=-1)  # (..., d): the half-split layout of HF checkpoints
    return (angles.cos() * mscale).to(dtype), (angles.sin() * mscale).to(dtype)

def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, heads, d) by cos/sin (B, T, d), pairing dimension i with i + d/2 (HF
    checkpoints store q/k projections permuted for this pairing, so they load without reordering)."""
    # in x's dtype: q/k from bf16 autocast matmuls made fp32 would send attention to a slow fp32 kernel
    cos, sin = cos[:, :, None, :].to(x.dtype), sin[:, :, None, :].to(x.dtype)  # broadcast over heads
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

def from_hf(config: dict, source: str = "config.json") -> RopeSettings:
    """RopeSettings from `rope_theta` + `rope_scaling` (transformers 4) or `rope_parameters` (5). An omitted field
    takes transformers' default; one not in HF_FIELDS[type] (nor partial_rotary_factor 1) is refused by name."""
    scaling = config.get("rope_scaling") or config.get("rope_parameters") or {}
    theta = float(scaling.get("rope_theta", config.get("rope_theta", 10000.0)))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in HF_FIELDS:
        raise UserError(f"unsupported rope type {kind!r} in {source}; supported: default, llama3 and yarn")
    unknown = sorted(k for k in scaling if k not in HF_FIELDS[kind] and (k, scaling[k]) != ("partial_rotary_factor", 1))
    if unknown:
        raise UserError(f"field {unknown[0]!r} of rope type {kind!r} in {source} is not supported by this project")
    if kind == "default":
        return RopeSettings(theta=theta)
    window = config.get("max_position_embeddings", 2048)  # transformers' default, as for the fields below
    original = int(config.get("original_max_position_embeddings",  # a top-level one wins, as in transformers
                              scaling.get("original_max_position_embeddings", window)))
    missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor") if scaling.get(k) is None]
    if kind == "llama3" and missing:  # transformers has no default for them either
        raise UserError(f"{source} lacks rope field {missing[0]!r}, which rope type 'llama3' needs")
    factor = float(window / original if scaling.get("factor") is None else scaling["factor"])
    attention = scaling.get("attention_factor")
    if attention is None and scaling.get("mscale") and scaling.get("mscale_all_dim"):  # DeepSeek-V3's spelling
        attention = yarn_mscale(factor, scaling["mscale"]) / yarn_mscale(factor, scaling["mscale_all_dim"])
    return RopeSettings(theta, kind, factor, original, float(scaling.get("low_freq_factor", 1)),
                        float(scaling.get("high_freq_factor", 4)), float(scaling.get("beta_fast") or 32),
                        float(scaling.get("beta_slow") or 1), attention, bool(scaling.get("truncate", True)))

def to_hf(s: RopeSettings, head_dim: int) -> dict:
    """`rope_theta` and `rope_scaling` with every field spelled out (engines disagree on defaults);
    NTK is exported as what it is, plain RoPE with a larger theta."""
    if s.kind in ("default", "ntk"):
        return {"rope_theta": ntk_theta(s, head_dim) if s.kind == "ntk" else s.theta, "rope_scaling": None}
    scaling = {"rope_type": s.kind, "factor": s.factor, "original_max_position_embeddings": s.original_max_position}
    llama3 = dict(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor)
    yarn = dict(beta_fast=s.beta_fast, beta_slow=s.beta_slow, attention_factor=s.mscale, truncate=s.truncate)
    return {"rope_theta": s.theta, "rope_scaling": {**scaling, **(llama3 if s.kind == "llama3" else yarn)}}

def parse_size(text: str | int) -> int:
    """'4M' -> 4194304, '128K' -> 131072, '512' -> 512 (binary K/M/G, as the paper's 1M/2M/4M)."""
    units, t = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}, str(text).strip().upper()
    try:
        return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except ValueError:
        raise UserError(f"cannot read size {text!r}; use a number with an optional K, M or G suffix (4M)") from None

def extend_settings(base: RopeSettings, ctx: int, kind: str = "yarn", original_max_position: int | None = None,
                    beta_fast: float = 4.0, beta_slow: float = 1.0) -> RopeSettings:
    """The stage-1 RoPE for a new window `ctx`: s is relative to the ORIGINAL pre-training window (8192
    for Llama 3.1, whose llama3 scaling is replaced, not stacked), so --ctx 1M/2M/4M gives s = 128/256/512.
    kind: yarn (the recipe), ntk, llama3 (retuned to ctx) or none (unchanged: the no-scaling ablation)."""
    if kind == "none":
        return base
    original = original_max_position or base.original_max_position
    return RopeSettings(base.theta, kind, ctx / original, original, base.low_freq_factor, base.high_freq_factor,
                        beta_fast, beta_slow)
