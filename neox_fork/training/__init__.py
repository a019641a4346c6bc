"""Training: the loop (loop), the optimizer, LR schedule and DeepSpeed engine (optim), the training state
on disk (state), the per-step logging keys and profilers (step_logging) and where reports go
(metrics). Only the entry points (and the benchmark) import this package.
The model's layers as stages of DeepSpeed's pipeline engine (pipeline).
The preference objectives DPO, KTO and reward models (preference).
"""
