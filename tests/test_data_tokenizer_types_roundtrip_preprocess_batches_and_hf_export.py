"""Each of upstream's tokenizer types gives the ids of its own library through preprocessing, training's batches,
the checkpoint and the Hugging Face export (transformers' AutoTokenizer on the exported folder).

The tokenizer files are made here: a byte-level BPE trained with `tokenizers` (vocab.json + merges.txt, a
tokenizer.json, and the same ranks as a .tiktoken file), a sentencepiece model trained in-process; the
character-level tokenizer needs none. The reference ids come from each library directly.
"""

import base64
import io
import json
import shutil

import pytest
import torch

from conftest import tiny_keys
from neox_fork.checkpoint import store as checkpoint
from neox_fork.config.loading import from_dict
from neox_fork.data._megatron import indexed_dataset
from neox_fork.data.datasets import DataSettings, build_datasets
from neox_fork.data.preprocess import preprocess
from neox_fork.data.tokenizer import TokenizerSource, build_tokenizer
from neox_fork.errors import UserError
from neox_fork.checkpoint.hf import export_folder
from neox_fork.model.transformer import build_model

CORPUS = [
    "Hello world, this is a tiny corpus for tiny tokenizers.",
    "def f(x):\n    return x * 2  # double  spaces\n",
    "Ünïcödé text, numbers 12345 67 and symbols #$%&.",
    "The quick brown fox jumps over the lazy dog.",
    "tabs\tand\nnewlines\n\nare kept",
] * 8
TEXTS = ["Hello quick fox 12345!", "  leading spaces and double  spaces", "Ünïcödé ☃ unseen chars", "x\ty\nz",
         "end of text <|endoftext|> inside"]
# cl100k_base's split pattern: what a .tiktoken file not named for one of tiktoken's encodings is read with
CL100K_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|"""
                  r"""\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
TYPES = ["GPT2BPETokenizer", "HFGPT2Tokenizer", "SPMTokenizer", "CharLevelTokenizer", "TiktokenTokenizer",
         "HFTokenizer"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from tokenizers import ByteLevelBPETokenizer

    root = tmp_path_factory.mktemp("neoxtok_tokenizers")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=330, min_frequency=2, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    (root / "gpt2").mkdir()
    bpe.save_model(str(root / "gpt2"))  # vocab.json + merges.txt
    bpe.save(str(root / "tokenizer.json"))

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=70,
                                   user_defined_symbols=["<|endoftext|>"], minloglevel=2)
    (root / "spm.model").write_bytes(model.getvalue())

    # the BPE's tokens as tiktoken ranks: bytes in base64, then the rank (<|endoftext|> becomes the special token)
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    to_byte = {char: byte for byte, char in bytes_to_unicode().items()}
    vocab = json.loads((root / "gpt2" / "vocab.json").read_text())
    ordered = [bytes(to_byte[c] for c in token) for token, _ in sorted(vocab.items(), key=lambda kv: kv[1])
               if token != "<|endoftext|>"]
    (root / "mini.tiktoken").write_text("".join(f"{base64.b64encode(b).decode()} {rank}\n"
                                                for rank, b in enumerate(ordered)))
    return root


def source_of(kind, files) -> TokenizerSource:
    return {
        "GPT2BPETokenizer": TokenizerSource(kind, str(files / "gpt2" / "vocab.json"),
                                            str(files / "gpt2" / "merges.txt")),
        "HFGPT2Tokenizer": TokenizerSource(kind, str(files / "gpt2")),
        "SPMTokenizer": TokenizerSource(kind, str(files / "spm.model")),
        "CharLevelTokenizer": TokenizerSource(kind),
        "TiktokenTokenizer": TokenizerSource(kind, str(files / "mini.tiktoken")),
        "HFTokenizer": TokenizerSource(kind, str(files / "tokenizer.json")),
    }[kind]


def reference(kind, files):
    """(encode, eod, vocab_size) from each library itself, as upstream's tokenizer classes use it."""
    if kind == "GPT2BPETokenizer":
        from transformers import GPT2Tokenizer

        tok = GPT2Tokenizer(str(files / "gpt2" / "vocab.json"), str(files / "gpt2" / "merges.txt"))
        vocab = json.loads((files / "gpt2" / "vocab.json").read_text())
        return tok.encode, vocab["<|endoftext|>"], len(vocab)
    if kind == "HFGPT2Tokenizer":  # GPT-2's BPE, plus the <|padding|> upstream adds as one more id
        from tokenizers import AddedToken, ByteLevelBPETokenizer

        tok = ByteLevelBPETokenizer(str(files / "gpt2" / "vocab.json"), str(files / "gpt2" / "merges.txt"))
        tok.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
        vocab = json.loads((files / "gpt2" / "vocab.json").read_text())
        return (lambda t: tok.encode(t).ids), vocab["<|endoftext|>"], len(vocab) + 1
    if kind == "SPMTokenizer":
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(files / "spm.model"))
        return sp.encode, sp.piece_to_id("<|endoftext|>"), sp.get_piece_size()
    if kind == "CharLevelTokenizer":
        return (lambda t: list(t.encode("utf-8"))), 0, 512
    if kind == "TiktokenTokenizer":
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        ranks = load_tiktoken_bpe(str(files / "mini.tiktoken"))
        enc = tiktoken.Encoding("mini", pat_str=CL100K_PATTERN, mergeable_ranks=ranks,
                                special_tokens={"<|endoftext|>": len(ranks)})
        return (lambda t: enc.encode(t, allowed_special="all")), len(ranks), len(ranks) + 1
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(files / "tokenizer.json"))
    encode = lambda t: tok.encode(t, add_special_tokens=False).ids  # noqa: E731
    return encode, tok.token_to_id("<|endoftext|>"), tok.get_vocab_size()


@pytest.mark.parametrize("kind", TYPES)
def test_ids_eod_and_vocab_size_are_the_librarys(kind, files):
    encode, eod, vocab_size = reference(kind, files)
    tokenizer = source_of(kind, files).build()
    for text in TEXTS:
        assert tokenizer.encode(text) == encode(text), text
    assert tokenizer.encode_batch(TEXTS) == [encode(t) for t in TEXTS]
    assert (tokenizer.eod, tokenizer.vocab_size) == (eod, vocab_size)
    assert all(0 <= i < vocab_size for t in TEXTS for i in encode(t))
    if kind != "CharLevelTokenizer":  # upstream's char-level decode maps each byte to one character
        assert tokenizer.decode(tokenizer.encode(CORPUS[0])) == CORPUS[0]


@pytest.mark.parametrize("kind", TYPES)
def test_preprocessing_and_training_batches_carry_the_librarys_ids(kind, files, tmp_path, one_process):
    encode, eod, vocab_size = reference(kind, files)
    source = source_of(kind, files)
    docs = CORPUS[:5] + TEXTS[:4]  # not TEXTS[4]: its literal <|endoftext|> is the eod, which ends documents
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    result = preprocess([str(tmp_path / "in.jsonl")], str(tmp_path / "data"), source.vocab_file,
                        tokenizer_type=kind, merge_file=source.merge_file, append_eod=True)
    expected = [encode(d) + [eod] for d in docs]
    dataset = indexed_dataset().IndexedDataset(result.outputs[0])
    assert [dataset[i].tolist() for i in range(len(docs))] == expected

    # training's batches: windows of whole documents (each ends in the tokenizer's eod), eod masked from the loss
    seq = 24
    train, _, _ = build_datasets(DataSettings(seq_length=seq, train_samples=40, train_data_paths=[result.outputs[0]],
                                              split=None, eod_mask_loss=True, cache_dir=str(tmp_path / "cache")),
                                 source.build())
    stream = [i for doc in expected for i in doc]
    for index in range(len(train)):
        item = train[index]
        window = item["tokens"].tolist() + [int(item["labels"][-1])]
        pieces = _split_after(window, eod)
        for piece in pieces[1:-1]:  # whole documents in between
            assert piece in expected
        assert _is_sublist(window[:len(pieces[0])], stream)
        assert torch.equal(item["loss_mask"], (item["tokens"] != eod).float())

    # the embedding is the tokenizer's ids padded to a multiple of 128 (upstream's make_vocab_size_divisible_by)
    config = from_dict(tiny_keys(vocab_size=None, tokenizer_type=kind, vocab_file=source.vocab_file,
                                 merge_file=source.merge_file))
    rows = build_model(config, source.build().vocab_size).shape.vocab_size
    assert rows % 128 == 0 and vocab_size <= rows < vocab_size + 128


def _split_after(ids, eod):
    pieces, current = [], []
    for i in ids:
        current.append(i)
        if i == eod:
            pieces.append(current)
            current = []
    return pieces + [current]


def _is_sublist(part, whole):
    return any(whole[i:i + len(part)] == part for i in range(len(whole) - len(part) + 1))


@pytest.mark.parametrize("kind", TYPES)
def test_checkpoint_carries_the_tokenizer_and_the_hf_export_gives_the_same_ids(kind, files, tmp_path, one_process):
    from transformers import AutoTokenizer

    from neox_fork.inference.generation import load_for_inference

    encode, eod, vocab_size = reference(kind, files)
    # the run's tokenizer files live in a folder that is gone by the time the checkpoint is read
    run_files = tmp_path / "run_files"
    shutil.copytree(files, run_files)
    source = source_of(kind, run_files)
    config = from_dict(tiny_keys(vocab_size=None, tokenizer_type=kind, vocab_file=source.vocab_file,
                                 merge_file=source.merge_file))
    model = build_model(config, source.build().vocab_size)
    checkpoint.save_model_checkpoint(tmp_path / "ckpt", 1, [checkpoint.model_state(model)], config,
                                     TokenizerSource.of_config(config))
    shutil.rmtree(run_files)

    _, _, tokenizer = load_for_inference(tmp_path / "ckpt")  # generation's and evaluation's tokenizer
    assert [tokenizer.encode(t) for t in TEXTS] == [encode(t) for t in TEXTS]

    export_folder(tmp_path / "ckpt", tmp_path / "hf")
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    for text in TEXTS[:4]:  # the literal <|endoftext|> of TEXTS[4] is checked below where it is a special token
        assert hf.encode(text, add_special_tokens=False) == encode(text), text
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_config["eos_token_id"] == eod
    assert len(hf) <= hf_config["vocab_size"]
    if kind in ("GPT2BPETokenizer", "HFGPT2Tokenizer", "TiktokenTokenizer", "HFTokenizer"):
        assert hf.eos_token_id == eod
        assert hf.encode(TEXTS[4], add_special_tokens=False) == encode(TEXTS[4])
    if kind == "HFGPT2Tokenizer":
        assert hf.pad_token == "<|padding|>" and len(hf) == vocab_size


def test_bad_tokenizer_files_are_one_line(files, tmp_path):
    with pytest.raises(UserError, match="merge-file must be set to a GPT-2 merges.txt for tokenizer-type "
                                        "GPT2BPETokenizer"):
        build_tokenizer("GPT2BPETokenizer", str(files / "gpt2" / "vocab.json"))
    with pytest.raises(UserError, match=f"vocab-file {tmp_path}/nope.model: no such file"):
        build_tokenizer("SPMTokenizer", str(tmp_path / "nope.model"))
    (tmp_path / "bad.model").write_text("not a model")
    with pytest.raises(UserError, match=f"vocab-file {tmp_path}/bad.model: not a sentencepiece model"):
        build_tokenizer("SPMTokenizer", str(tmp_path / "bad.model"))
    # a file named for one of tiktoken's encodings must be that encoding's published file
    shutil.copyfile(files / "mini.tiktoken", tmp_path / "cl100k_base.tiktoken")
    with pytest.raises(UserError, match="cl100k_base.tiktoken: not a usable .tiktoken BPE file"):
        build_tokenizer("TiktokenTokenizer", str(tmp_path / "cl100k_base.tiktoken"))
    with pytest.raises(UserError, match="HFGPT2Tokenizer .*nothing downloads here"):
        build_tokenizer("HFGPT2Tokenizer", None)
    assert type(build_tokenizer("spmtokenizer", str(files / "spm.model"))).__name__ == "SPMTokenizer"  # as upstream
