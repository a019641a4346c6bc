"""The model: the GPT-NeoX family from megatron-core tensor-parallel layers (transformer), the attention
backends (attention) and the fused kernels with their plain-torch fallbacks (fused).
"""
