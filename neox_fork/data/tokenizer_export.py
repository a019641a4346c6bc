"""Each tokenizer type as files transformers' AutoTokenizer reads with the same ids (the Hugging Face export).

    HFTokenizer         the tokenizer.json as a PreTrainedTokenizerFast
    GPT2BPETokenizer    GPT2TokenizerFast from vocab.json + merges.txt
    HFGPT2Tokenizer     the folder's GPT2TokenizerFast with `<|padding|>` added, as training used it
    SPMTokenizer        a tokenizer.json built from the .model by transformers' sentencepiece converter (it
                        follows the model's normalizer); the .model is copied beside it
    TiktokenTokenizer   a byte-level BPE tokenizer.json by transformers' tiktoken converter, specials included
    CharLevelTokenizer  a byte-level tokenizer.json whose 256 byte tokens have the byte's value as id

The eos token of the folder is the tokenizer's eod wherever that does not change ids; SPMTokenizer and
CharLevelTokenizer leave it out (a special token would change the ids of text that spells it: the dummy
prefix after a literal `<|endoftext|>`, the characters that stand for bytes 0 and 1), and config.json /
generation_config.json carry the eod id for all types.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from neox_fork.data.tokenizer import EOD_TOKEN, TokenizerSource


def save_hf_tokenizer(source, output_dir, model_max_length: int, *, pad_token_id: int | None = None,
                      from_hf_folder: bool = False) -> None:
    """Write the transformers tokenizer files of `source` (a TokenizerSource, or a tokenizer.json path).

    `from_hf_folder` (upstream's --vocab-is-hf-tokenizer): the vocab file's folder is a transformers tokenizer
    folder, saved as AutoTokenizer reads it. `pad_token_id` names the pad token (upstream's --pad-token-id)."""
    if not isinstance(source, TokenizerSource):
        source = TokenizerSource("HFTokenizer", str(source))
    output_dir = Path(output_dir)
    writer = {"HFTokenizer": _hf, "GPT2BPETokenizer": _gpt2_bpe, "HFGPT2Tokenizer": _hf_gpt2,
              "SPMTokenizer": _spm, "TiktokenTokenizer": _tiktoken, "CharLevelTokenizer": _char_level}
    tok = _hf_folder(source) if from_hf_folder else writer[source.tokenizer_type](source)
    tok.model_max_length = model_max_length
    if pad_token_id is not None:
        tok.pad_token = tok.convert_ids_to_tokens(pad_token_id)
    tok.save_pretrained(str(output_dir))
    if source.tokenizer_type == "SPMTokenizer":
        shutil.copyfile(source.vocab_file, output_dir / "tokenizer.model")


def _hf_folder(source: TokenizerSource):
    from transformers import AutoTokenizer

    from neox_fork.errors import UserError

    folder = source.vocab_file if Path(source.vocab_file).is_dir() else str(Path(source.vocab_file).parent)
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as err:  # noqa: BLE001 - transformers raises many kinds for a folder it cannot read
        raise UserError(f"--vocab-is-hf-tokenizer: {folder} is not a transformers tokenizer folder "
                        f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None


def _fast(tokenizer_object, **special):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tokenizer_object, **special)


def _hf(source: TokenizerSource):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=source.vocab_file)
    if tok.convert_tokens_to_ids(EOD_TOKEN) is not None:
        tok.add_special_tokens({"eos_token": EOD_TOKEN, "bos_token": EOD_TOKEN, "unk_token": EOD_TOKEN})
    return tok


def _gpt2_bpe(source: TokenizerSource):
    from transformers import GPT2TokenizerFast

    return GPT2TokenizerFast(vocab=source.vocab_file, merges=source.merge_file,
                             unk_token=EOD_TOKEN, bos_token=EOD_TOKEN, eos_token=EOD_TOKEN)


def _hf_gpt2(source: TokenizerSource):
    tokenizer = source.build()
    return tokenizer.hf


def _spm(source: TokenizerSource):
    from transformers.convert_slow_tokenizer import SentencePieceExtractor, SpmConverter

    proto = SentencePieceExtractor(source.vocab_file).proto
    if proto.trainer_spec.model_type == 1:  # unigram: pieces with scores
        vocab = [(p.piece, p.score) for p in proto.pieces]
    else:  # BPE: merges regenerated from the piece scores
        vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    tokenizer_object = SpmConverter.build_tokenizer_from_spm_proto(proto=proto, vocab=vocab, legacy=True)
    unk = proto.trainer_spec.unk_piece if proto.trainer_spec.unk_id >= 0 else None
    return _fast(tokenizer_object, unk_token=unk)


def _tiktoken(source: TokenizerSource):
    from transformers.convert_slow_tokenizer import TikTokenConverter

    encoding = source.build().encoding
    ranks = len(encoding._mergeable_ranks)
    specials = {i: token for token, i in encoding._special_tokens.items()}
    # the converter appends special tokens after the ranks in order: fill gaps so each keeps its id
    extra = [specials.get(i, f"<|reserved_token_{i}|>") for i in range(ranks, encoding.n_vocab)]
    # tiktoken's regex reads `{1,3}+` as possessive; the `tokenizers` regex (Oniguruma) as a repeated repeat
    pattern = encoding._pat_str.replace("}+", "}")
    tokenizer_object = TikTokenConverter(vocab_file=source.vocab_file, pattern=pattern,
                                         extra_special_tokens=extra).converted()
    eos = specials.get(encoding.eot_token)
    return _fast(tokenizer_object, eos_token=eos, bos_token=eos)


def _char_level(source: TokenizerSource):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_chars = bytes_to_unicode()
    vocab = {byte_chars[b]: b for b in range(256)}
    tokenizer_object = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer_object.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer_object.decoder = decoders.ByteLevel()
    return _fast(tokenizer_object)
