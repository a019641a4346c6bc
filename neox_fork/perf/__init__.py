"""Performance: FLOPs/MFU and the memory model (flops), the throughput benchmark (benchmark), activation
memory at TP=N (activation_memory) and what tools/model_summary.py prints (summary).
"""
