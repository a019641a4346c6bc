"""Data pipeline: tokenizers, preprocessing into Megatron .bin/.idx, training datasets and batches.

    build_tokenizer(tokenizer_type, vocab_file) -> tokenizer with encode/encode_batch/decode/eod/vocab_size
    tokenizer_file_vocab_size(vocab_file) -> int | None
    neox_fork.data.preprocess.preprocess(inputs, output_prefix, vocab_file, ...) -> PreprocessResult
    neox_fork.data.chat.preprocess_chat(inputs, output_prefix, tokenizer_path, ...) -> PreprocessResult
    DataSettings.from_config(config, world_size) -> the data settings of a run, passed to:
    validate_data_paths(settings, tokenizer) -> DataPlan          (raises UserError; call before training)
    build_datasets(settings, tokenizer) -> (train, valid, test)   (GPTSamples or None)
    build_batch_iterator(dataset, consumed_samples=..., micro_batch_size=..., ...) -> batches

Submodules import megatron-core lazily (it takes seconds), so importing this package is cheap.
"""

from neox_fork.data.tokenizer import HFTokenizer, build_tokenizer, tokenizer_file_vocab_size


def __getattr__(name):
    # Lazy re-exports: keep `import neox_fork.data` free of torch/megatron import time.
    if name in ("DataSettings", "build_datasets", "build_batch_iterator", "validate_data_paths", "GPTSamples",
                "PretrainingBatchSampler"):
        from neox_fork.data import datasets

        return getattr(datasets, name)
    raise AttributeError(f"module 'neox_fork.data' has no attribute {name!r}")


__all__ = [
    "HFTokenizer",
    "build_tokenizer",
    "tokenizer_file_vocab_size",
    "DataSettings",
    "validate_data_paths",
    "build_datasets",
    "build_batch_iterator",
    "GPTSamples",
    "PretrainingBatchSampler",
]
