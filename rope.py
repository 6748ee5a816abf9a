"""Rotary position embeddings (RoPE) and the scalings that stretch them to longer windows.

One settings dataclass, `RopeSettings`, describes every variant this project uses:

    default  plain RoPE: inv_freq_i = theta^(-2i/d)
    llama3   Llama 3.1's own scaling (factor 8 over an original 8192 window -> 128K)
    yarn     YaRN (Peng et al. 2023): the recipe's choice to reach 1M-4M tokens
    ntk      NTK-aware theta scaling: theta' = theta * s^(d/(d-2)) (the paper's ablation)

Three rules keep RoPE exact at 4M tokens:
1. inv_freq is computed in fp32 exactly the way the Hugging Face reference does, so a checkpoint
   means the same rotation here as in transformers and in serving engines (bit-identical inv_freq).
2. The angle position * inv_freq is formed in float64. An fp32 inv_freq has a 24-bit mantissa and
   a position below 2^29 fits in 29 bits, so the float64 product is exact; fp32 would round the
   angle at position 4,194,303 to a multiple of 0.25 rad. cos/sin are taken in float64 too and
   cast to the activations' dtype only at the end.
3. cos/sin are computed for the positions a rank actually holds (a context-parallel shard, a
   packed batch), never as a table over the whole window (4M x 128 fp32 is 2 GiB per copy).
"""

import math
from dataclasses import dataclass

import torch

ROPE_KINDS = ("default", "llama3", "yarn", "ntk")


class UserError(ValueError):
    """The one error type for a user's mistake (a flag, a file, a line, a config field). The
    scripts print it as one sentence, never a traceback. It lives here because rope.py is the
    file every other one imports."""


@dataclass
class RopeSettings:
    theta: float = 500000.0
    kind: str = "default"  # one of ROPE_KINDS
    factor: float = 1.0  # s: how many times longer the new window is than original_max_position
    original_max_position: int = 8192  # the window the frequencies were trained for (L)
    # llama3 only
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    # yarn only: the paper uses alpha = beta_slow = 1 and beta = beta_fast = 4
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None  # None -> 0.1 ln(s) + 1 (YaRN's temperature)

    def __post_init__(self):
        if self.kind not in ROPE_KINDS:
            raise ValueError(f"unknown rope type {self.kind!r}; expected one of {', '.join(ROPE_KINDS)}")
        if self.kind != "default" and self.factor < 1.0:
            raise ValueError(f"rope scaling factor must be >= 1, got {self.factor}")

    @property
    def mscale(self) -> float:
        """Multiplier applied to both cos and sin (so q.k is scaled by its square)."""
        if self.kind != "yarn":
            return 1.0
        if self.attention_factor is not None:
            return float(self.attention_factor)
        return yarn_attention_factor(self.factor)


def yarn_attention_factor(factor: float) -> float:
    # YaRN's sqrt(1/t) = 0.1 ln(s) + 1; no temperature for s <= 1
    return 1.0 if factor <= 1.0 else 0.1 * math.log(factor) + 1.0


# ----------------------------------------------------------------------------------------------
# inverse frequencies (fp32, bit-identical to the Hugging Face reference)

def default_inv_freq(theta: float, head_dim: int) -> torch.Tensor:
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim  # (d/2,)
    return 1.0 / (theta ** exponents)


def llama3_inv_freq(s: RopeSettings, head_dim: int) -> torch.Tensor:
    """Llama 3.1: long wavelengths divided by factor, short ones kept, a smooth blend between."""
    inv_freq = default_inv_freq(s.theta, head_dim)
    low_freq_wavelen = s.original_max_position / s.low_freq_factor
    high_freq_wavelen = s.original_max_position / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def yarn_correction_range(s: RopeSettings, head_dim: int) -> tuple[int, int]:
    """Dimensions [low, high] over which YaRN ramps from 'keep' to 'divide by s'.

    correction_dim(r) is the dimension whose wavelength fits r times into the original window:
    dimensions that rotate more than beta_fast times are left alone (they only see local order),
    those that rotate fewer than beta_slow times are interpolated (divided by s).
    """
    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(s.original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(s.theta))

    low = math.floor(correction_dim(s.beta_fast))
    high = math.ceil(correction_dim(s.beta_slow))
    return max(low, 0), min(high, head_dim - 1)


def yarn_inv_freq(s: RopeSettings, head_dim: int) -> torch.Tensor:
    pos_freqs = s.theta ** (torch.arange(0, head_dim, 2).float() / head_dim)  # (d/2,)
    extrapolation = 1.0 / pos_freqs  # the original frequencies
    interpolation = 1.0 / (s.factor * pos_freqs)  # frequencies divided by s
    low, high = yarn_correction_range(s, head_dim)
    if low == high:
        high += 0.001  # a one-dimension ramp would divide by zero
    ramp = torch.clamp((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # 1 on the fast (high-frequency) dimensions, 0 on the slow ones
    return interpolation * (1 - keep) + extrapolation * keep


def ntk_theta(s: RopeSettings, head_dim: int) -> float:
    # NTK-aware: raise the base so the slowest dimension is stretched by s, the fastest barely
    return s.theta * s.factor ** (head_dim / (head_dim - 2))


def inv_freq(s: RopeSettings, head_dim: int) -> torch.Tensor:
    """The d/2 inverse frequencies, fp32, for any RopeSettings."""
    if s.kind == "llama3":
        return llama3_inv_freq(s, head_dim)
    if s.kind == "yarn":
        return yarn_inv_freq(s, head_dim)
    if s.kind == "ntk":
        return default_inv_freq(ntk_theta(s, head_dim), head_dim)
    return default_inv_freq(s.theta, head_dim)


# ----------------------------------------------------------------------------------------------
# cos/sin for explicit positions, and applying the rotation

def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, mscale: float = 1.0,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * inv_freq, shaped (*positions.shape, head_dim).

    positions: integer tensor of any shape, the true global positions of the tokens held.
    The product is exact in float64 (see the module docstring); YaRN's mscale multiplies both.
    """
    angles = positions.to(torch.float64)[..., None] * inv_freq.to(positions.device, torch.float64)  # (..., d/2)
    angles = torch.cat((angles, angles), dim=-1)  # (..., d): the half-split layout of HF checkpoints
    return (angles.cos() * mscale).to(dtype), (angles.sin() * mscale).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, heads, d) by cos/sin (B, T, d), pairing dimension i with i + d/2.

    Hugging Face Llama checkpoints store q/k projections permuted for this half-split pairing,
    so the weights load without any reordering.
    """
    # in x's dtype: under autocast q/k come out of bf16 matmuls while cos/sin were made for the
    # fp32 residual stream, and fp32 q/k would send attention to a far slower fp32 kernel
    cos, sin = cos[:, :, None, :].to(x.dtype), sin[:, :, None, :].to(x.dtype)  # broadcast over heads
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


# ----------------------------------------------------------------------------------------------
# the Hugging Face config.json spelling, both ways

def from_hf(config: dict) -> RopeSettings:
    """RopeSettings from a Hugging Face config dict (`rope_theta` + `rope_scaling`, or the newer
    `rope_parameters` that holds both)."""
    params = dict(config.get("rope_parameters") or {})
    scaling = dict(config.get("rope_scaling") or params)
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return RopeSettings(theta=theta)
    if kind not in ("llama3", "yarn"):
        raise ValueError(f"unsupported rope type {kind!r} in config.json; this project supports "
                         f"default, llama3 and yarn")
    original = scaling.get("original_max_position_embeddings")
    if original is None:
        raise ValueError(f"rope_scaling of type {kind!r} needs original_max_position_embeddings")
    factor = scaling.get("factor")
    if factor is None:  # allowed by HF for yarn: derived from the window
        factor = config["max_position_embeddings"] / original
    if kind == "llama3":
        return RopeSettings(theta=theta, kind="llama3", factor=float(factor), original_max_position=int(original),
                            low_freq_factor=float(scaling["low_freq_factor"]),
                            high_freq_factor=float(scaling["high_freq_factor"]))
    return RopeSettings(theta=theta, kind="yarn", factor=float(factor), original_max_position=int(original),
                        beta_fast=float(scaling.get("beta_fast") or 32.0),
                        beta_slow=float(scaling.get("beta_slow") or 1.0),
                        attention_factor=scaling.get("attention_factor"))


def to_hf(s: RopeSettings, head_dim: int) -> dict:
    """The config.json fields for these settings: `rope_theta` and `rope_scaling`, every field
    spelled out (engines disagree on defaults, so nothing is left implicit).

    NTK-aware scaling is exported as what it is mathematically, plain RoPE with a larger theta,
    which every engine understands.
    """
    if s.kind == "default":
        return {"rope_theta": s.theta, "rope_scaling": None}
    if s.kind == "ntk":
        return {"rope_theta": ntk_theta(s, head_dim), "rope_scaling": None}
    if s.kind == "llama3":
        return {"rope_theta": s.theta, "rope_scaling": {
            "rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor, "original_max_position_embeddings": s.original_max_position}}
    return {"rope_theta": s.theta, "rope_scaling": {
        "rope_type": "yarn", "factor": s.factor, "original_max_position_embeddings": s.original_max_position,
        "beta_fast": s.beta_fast, "beta_slow": s.beta_slow, "attention_factor": s.mscale, "truncate": True}}


# ----------------------------------------------------------------------------------------------
# the paper's settings from a target window

def parse_size(text: str | int) -> int:
    """'4M' -> 4194304, '128K' -> 131072, '512' -> 512 (binary K/M/G, as the paper's 1M/2M/4M)."""
    if isinstance(text, int):
        return text
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper()
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        raise UserError(f"cannot read size {text!r}; use a number with an optional K, M or G suffix (e.g. 4M)") from None


def extend_settings(base: RopeSettings, ctx: int, kind: str = "yarn", original_max_position: int | None = None,
                    beta_fast: float = 4.0, beta_slow: float = 1.0) -> RopeSettings:
    """The stage-1 RoPE for a new window `ctx`, following the paper.

    The scale s is relative to the ORIGINAL pre-training window (8192 for Llama 3.1: its own
    llama3 scaling is replaced, not stacked), so --ctx 1M/2M/4M gives s = 128/256/512.
    kind: yarn (the recipe), ntk (ablation), llama3 (keep Llama 3.1's scaling, retuned to ctx),
    none (keep the base settings unchanged: the no-scaling ablation).
    """
    original = original_max_position or base.original_max_position
    factor = ctx / original
    if kind == "none":
        return base
    if kind == "yarn":
        return RopeSettings(theta=base.theta, kind="yarn", factor=factor, original_max_position=original,
                            beta_fast=beta_fast, beta_slow=beta_slow)
    if kind == "ntk":
        return RopeSettings(theta=base.theta, kind="ntk", factor=factor, original_max_position=original)
    if kind == "llama3":
        return RopeSettings(theta=base.theta, kind="llama3", factor=factor, original_max_position=original,
                            low_freq_factor=base.low_freq_factor, high_freq_factor=base.high_freq_factor)
    raise ValueError(f"unknown --rope {kind!r}; expected yarn, ntk, llama3 or none")

