"""Checkpoints, the one owner of names and layouts: step folders, safe reads, atomic publish and TP
merge/split (store), unpickling without running code (safe_unpickle), GPT-NeoX's layer layout
(neox_layout), DeepSpeed's Universal Checkpointing (universal), the Hugging Face mapping per
family and the converters' command lines (hf, hf_cli), and what checkpoint files hold
(inspection).
The one write-to-temp-then-rename, also used for data, tokenizers and exports (atomic).
The on-disk names of checkpoints: step folders, pointer files (names).
"""
