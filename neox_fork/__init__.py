"""neox_fork: a GPT-NeoX-compatible training stack for StableLM-3B-4E1T-class models."""

__version__ = "0.1.0"

import warnings

# megatron-core warns at import that it falls back to its own kernels when Apex/TE are absent; we never
# use those kernels (we do not depend on Apex), so the warning is noise for every command. The one filter
# for it: every import of megatron-core here (parallel, model, data) comes after this package's.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
