"""Parallelism: process groups, the per-rank RNG streams and DeepSpeed's view of the TP/DP groups
(groups).
"""
