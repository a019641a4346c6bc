"""RoPE scaling: the rotary inverse frequencies and the attention factor of each type, from the config's
`rope_scaling` fields (transformers' names), computed with the same operations in the same order as
transformers' `ROPE_INIT_FUNCTIONS` (modeling_rope_utils.py, 5.x), so they agree to the last fp32 bit
(tests/test_rope_scaling_matches_transformers.py).

    default   base ** (-2i / dim)
    linear    default / factor (position interpolation)
    dynamic   NTK: the base grows with the sequence length once it passes original_max_position_embeddings
    yarn      NTK-by-parts: a ramp between interpolated and original frequencies; attention factor (mscale)
    longrope  per-frequency short_factor up to original_max_position_embeddings, long_factor past it
    llama3    Llama 3.1: low frequencies / factor, high ones kept, a smooth ramp between

`dim` is the rotary dims of a head (rotary_pct x head size: 25% for Pythia/StableLM), `base` rotary_emb_base.
Each function returns (inv_freq [dim / 2] fp32, attention_factor); the model multiplies cos and sin by the
attention factor, as transformers does. `dynamic` and `longrope` depend on `seq_len`, the longest position of
the call plus one (transformers: max(position_ids) + 1), so `Rotary` recomputes them per forward.

`fields` is the config's `rope_scaling` resolved by `resolve`: `original_max_position_embeddings` defaults to
the model's max positions, as transformers defaults it to `max_position_embeddings`. One difference for
`dynamic`: transformers' threshold is `max_position_embeddings` itself; ours is
`original_max_position_embeddings` (default max_position_embeddings, the same thing), so that
max_position_embeddings can say how far generation may go (the export writes the threshold back as HF's
`max_position_embeddings`, see checkpoint/hf.py).
"""

from __future__ import annotations

import math

import torch

TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")
DEPENDS_ON_LENGTH = ("dynamic", "longrope")


def rope_type(scaling: dict | None) -> str:
    """The type a `rope_scaling` dict names (`rope_type`, or `type` as upstream's PR #1001 and transformers 4
    spell it); 'default' for none."""
    if not scaling:
        return "default"
    return scaling.get("rope_type", scaling.get("type", "default"))


def resolve(scaling: dict | None, max_positions: int) -> dict:
    """The fields the functions read: the dict without its type, original_max_position_embeddings filled."""
    fields = {k: v for k, v in (scaling or {}).items() if k not in ("rope_type", "type")}
    if rope_type(scaling) != "default":
        fields.setdefault("original_max_position_embeddings", max_positions)
    return fields


def _arange(dim: int, device=None) -> torch.Tensor:
    return torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float)


def default(dim: int, base: float, fields: dict, max_positions: int, seq_len=None, device=None):
    return 1.0 / (base ** (_arange(dim, device) / dim)), 1.0


def linear(dim, base, fields, max_positions, seq_len=None, device=None):
    inv_freq = 1.0 / (base ** (_arange(dim, device) / dim))
    inv_freq /= fields["factor"]
    return inv_freq, 1.0


def dynamic(dim, base, fields, max_positions, seq_len=None, device=None):
    """`seq_len` None or an int at most the threshold: the default frequencies (transformers' value at init,
    computed the same way); a 0-d integer tensor past it: the grown base, in fp32 tensor arithmetic as
    transformers' forward computes it."""
    factor, original = fields["factor"], fields["original_max_position_embeddings"]
    if seq_len is None:
        seq_len = original
    elif isinstance(seq_len, torch.Tensor):
        seq_len = torch.maximum(seq_len, torch.tensor(original, dtype=seq_len.dtype, device=seq_len.device))
    else:
        seq_len = max(seq_len, original)
    base = base * ((factor * seq_len / original) - (factor - 1)) ** (dim / (dim - 2))
    return 1.0 / (base ** (_arange(dim, device) / dim)), 1.0


def yarn_get_mscale(scale=1.0, mscale=1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def yarn(dim, base, fields, max_positions, seq_len=None, device=None):
    factor = fields["factor"]
    original = fields["original_max_position_embeddings"]
    attention_factor = fields.get("attention_factor")
    mscale, mscale_all_dim = fields.get("mscale"), fields.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = yarn_get_mscale(factor)
    beta_fast = fields.get("beta_fast") or 32
    beta_slow = fields.get("beta_slow") or 1

    def correction_dim(rotations):  # the dim whose wavelength turns `rotations` times over the original length
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if fields.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: no division by zero
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)

    pos_freqs = base ** (torch.arange(0, dim, 2).to(device=device, dtype=torch.float) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp.to(device=device, dtype=torch.float)  # 1: the original frequency, 0: interpolated
    return interpolation * (1 - keep) + extrapolation * keep, attention_factor


def longrope(dim, base, fields, max_positions, seq_len=None, device=None):
    """short_factor up to original_max_position_embeddings, long_factor once `seq_len` passes it;
    `factor` (default max positions / original) only sets the attention factor."""
    original = fields["original_max_position_embeddings"]
    factor = fields.get("factor")
    if factor is None:
        factor = max_positions / original
    attention_factor = fields.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    long = seq_len and seq_len > original
    ext = torch.tensor(fields["long_factor" if long else "short_factor"], dtype=torch.float32, device=device)
    shape = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    return 1.0 / (ext * base**shape), attention_factor


def llama3(dim, base, fields, max_positions, seq_len=None, device=None):
    inv_freq = 1.0 / (base ** (_arange(dim, device) / dim))
    factor, low_freq_factor = fields["factor"], fields["low_freq_factor"]
    high_freq_factor, old_context = fields["high_freq_factor"], fields["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context / low_freq_factor, old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)  # long wavelengths / factor
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(medium, smoothed, scaled), 1.0


FUNCTIONS = {"default": default, "linear": linear, "dynamic": dynamic, "yarn": yarn, "longrope": longrope,
             "llama3": llama3}


def frequencies(scaling: dict | None, dim: int, base: float, max_positions: int, seq_len=None, device=None):
    """(inv_freq, attention_factor) of the config's `rope_scaling` for rotary dims `dim`."""
    return FUNCTIONS[rope_type(scaling)](dim, base, resolve(scaling, max_positions), max_positions, seq_len, device)


def describe(scaling: dict | None) -> str:
    """One short phrase for summaries: 'default', 'yarn x4 from 2048', ..."""
    kind = rope_type(scaling)
    if kind == "default":
        return kind
    fields = resolve(scaling, 0)
    factor = f" x{fields['factor']:g}" if fields.get("factor") is not None else ""
    original = fields["original_max_position_embeddings"]
    return kind + factor + (f" from {original}" if original else "")
