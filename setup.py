from setuptools import find_packages, setup

setup(
    name="neox_fork",
    version="0.1.0",
    description="GPT-NeoX-compatible training stack for StableLM-3B-4E1T-class models",
    packages=find_packages(include=["neox_fork", "neox_fork.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch",
        "deepspeed>=0.19,<0.20",
        "megatron-core==0.16.1",
        "transformers>=5,<6",
        "safetensors",
        "tokenizers",
        "sentencepiece",
        "tiktoken",
        "pyyaml",
        "numpy",
        "tqdm",
        "zstandard",
    ],
    extras_require={
        "gpu": ["flash-attn>=2.6"],
        "bnb": ["bitsandbytes"],
        "optimizers": ["lion-pytorch==0.2.5", "madgrad==1.3", "pytorch-optimizer==4.1.0"],
        "eval": ["lm-eval[hf]>=0.4.9,<0.5"],
        "logging": ["tensorboard", "wandb", "comet_ml"],
        "test": ["pytest", "pytest-timeout", "pytest-xdist"],
    },
)
