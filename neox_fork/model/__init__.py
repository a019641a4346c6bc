"""The model: the GPT-NeoX family from megatron-core tensor-parallel layers (transformer), the attention
backends (attention), the fused kernels with their plain-torch fallbacks (fused), the shape resolved
from the config with its parameter count by formula (shape), and RoPE scaling's frequencies (rope_scaling).
"""
