"""Inference: sampling with a KV cache and cooperating TP ranks (generation), and lm-evaluation-harness
on our model (evaluation).
"""
