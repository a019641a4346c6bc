"""Chat preprocessing writes the token and label ids GPT-NeoX's preprocess_data_with_chat_template.py
writes: computed here independently, turn by turn, from transformers' apply_chat_template on the same
tokenizer folder (each turn's text tokenized on its own), and for a few cases by hand."""

import json
from pathlib import Path

import numpy
import pytest

from neox_fork.data.chat import ChatOptions, preprocess_chat
from neox_fork.errors import UserError

REPO = Path(__file__).resolve().parents[1]
IGNORE = -100
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SINGLE = [{"role": "user", "content": "What colour is the sky?"}, {"role": "assistant", "content": "Green."}]
MULTI = [
    {"role": "user", "content": "Hello there."},
    {"role": "assistant", "content": "Bright day!"},
    {"role": "user", "content": "How many moons?"},
    {"role": "assistant", "content": "Three moons."},
]
SYSTEM = [{"role": "system", "content": "Answer briefly."}] + SINGLE
ENDS_WITH_USER = MULTI[:3]
CONVERSATIONS = [SINGLE, MULTI, SYSTEM, ENDS_WITH_USER]


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory):
    """A byte-level BPE trained on a few sentences, ChatML special tokens, a ChatML-like template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    sentences = [m["content"] for conv in CONVERSATIONS for m in conv] + ["user assistant system"]
    bpe.train_from_iterator(sentences * 5, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    folder = tmp_path_factory.mktemp("sftdata_tok")
    tokenizer.save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def hf(tokenizer_folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_folder)


def _expected(hf, conv, generation_role="assistant", only_last=False):
    """Upstream's rule, computed from rendered text: turn i's text is the template's rendering of
    turns 1..i (with the generation prompt when turn i+1 is the model's) minus that of turns 1..i-1;
    each turn's text is tokenized on its own."""
    tokens, labels, previous = [], [], ""
    for i, message in enumerate(conv):
        prompt = i + 1 < len(conv) and conv[i + 1]["role"] == generation_role
        text = hf.apply_chat_template(conv[: i + 1], tokenize=False, add_generation_prompt=prompt)
        assert text.startswith(previous)
        ids = hf(text[len(previous):], add_special_tokens=False)["input_ids"]
        previous = text
        tokens += ids
        trained = message["role"] == generation_role and (not only_last or i == len(conv) - 1)
        labels += ids if trained else [IGNORE] * len(ids)
    # the independent per-turn tokenization must agree with tokenizing the whole text at once
    assert tokens == hf(previous, add_special_tokens=False)["input_ids"]
    tokens.append(hf.eos_token_id)
    labels.append(hf.eos_token_id if labels[-1] != IGNORE else IGNORE)
    return tokens, labels


def _write(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _read(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix))
    return [dataset[i].tolist() for i in range(len(dataset))], dataset[0].dtype


def _run(tmp_path, tokenizer_folder, options=ChatOptions(), conversations=CONVERSATIONS, **kwargs):
    tmp_path.mkdir(exist_ok=True)
    src = _write(tmp_path / "chats.jsonl", [{"conversation": conv} for conv in conversations])
    preprocess_chat([str(src)], str(tmp_path / "out"), tokenizer_folder, options=options, **kwargs)
    tokens, token_dtype = _read(tmp_path / "out_conversation_document")
    labels, label_dtype = _read(tmp_path / "out_conversation_label_document")
    assert label_dtype == numpy.int32  # signed: -100 is stored as -100
    return tokens, labels


@pytest.mark.parametrize("only_last", [False, True], ids=["all-turns", "only-last"])
def test_tokens_and_labels_equal_the_template_rendered_turn_by_turn(tmp_path, tokenizer_folder, hf, only_last):
    tokens, labels = _run(tmp_path, tokenizer_folder, ChatOptions(only_last=only_last))
    for conv, got_tokens, got_labels in zip(CONVERSATIONS, tokens, labels):
        assert (got_tokens, got_labels) == _expected(hf, conv, only_last=only_last)
        assert len(got_tokens) == len(got_labels)


def test_trained_positions_are_the_replies_by_hand(tmp_path, tokenizer_folder, hf):
    tokens, labels = _run(tmp_path, tokenizer_folder)
    trained = [hf.decode([t for t in doc if t != IGNORE]) for doc in labels]
    eos = "<|endoftext|>"
    assert trained == [
        f"Green.<|im_end|>\n{eos}",
        f"Bright day!<|im_end|>\nThree moons.<|im_end|>\n{eos}",
        f"Green.<|im_end|>\n{eos}",
        "Bright day!<|im_end|>\n",  # ends with a user turn: its end-of-sequence is not a target
    ]
    # the generation prompt belongs to the user's turn: masked, and right before the reply
    assert hf.decode(tokens[0]) == (
        f"<|im_start|>user\nWhat colour is the sky?<|im_end|>\n<|im_start|>assistant\nGreen.<|im_end|>\n{eos}"
    )
    first_target = next(j for j, label in enumerate(labels[0]) if label != IGNORE)
    assert hf.decode(tokens[0][:first_target]).endswith("<|im_start|>assistant\n")
    # with --only-last only the last reply (and its end-of-sequence) is trained
    _, last = _run(tmp_path / "last", tokenizer_folder, ChatOptions(only_last=True), conversations=[MULTI])
    assert hf.decode([t for t in last[0] if t != IGNORE]) == f"Three moons.<|im_end|>\n{eos}"


def test_generation_role_chooses_the_trained_turns(tmp_path, hf):
    # a template whose generation prompt opens a "bot" turn, and a conversation between "user" and "bot"
    folder = tmp_path / "tok"
    hf.save_pretrained(str(folder))
    (folder / "chat_template.jinja").write_text(CHATML.replace("assistant", "bot"))
    conv = [dict(m, role="bot" if m["role"] == "assistant" else m["role"]) for m in MULTI]
    from transformers import AutoTokenizer

    bot_hf = AutoTokenizer.from_pretrained(str(folder))
    tokens, labels = _run(tmp_path, str(folder), ChatOptions(generation_role="bot"), conversations=[conv])
    assert (tokens[0], labels[0]) == _expected(bot_hf, conv, generation_role="bot")
    assert hf.decode([t for t in labels[0] if t != IGNORE]) == "Bright day!<|im_end|>\nThree moons.<|im_end|>\n<|endoftext|>"


def test_no_mask_trains_every_token_of_the_rendering_without_eos(tmp_path, tokenizer_folder, hf):
    tokens, labels = _run(tmp_path, tokenizer_folder, ChatOptions(no_mask=True))
    for conv, got_tokens, got_labels in zip(CONVERSATIONS, tokens, labels):
        whole = hf(hf.apply_chat_template(conv, tokenize=False), add_special_tokens=False)["input_ids"]
        assert got_tokens == whole
        assert got_labels == whole


def test_for_rm_trains_only_a_final_eos(tmp_path, tokenizer_folder, hf):
    tokens, labels = _run(tmp_path, tokenizer_folder, ChatOptions(for_rm=True))
    eos = hf.eos_token_id
    for conv, got_tokens, got_labels in zip(CONVERSATIONS, tokens, labels):
        whole = hf(hf.apply_chat_template(conv, tokenize=False), add_special_tokens=False)["input_ids"]
        assert got_tokens == whole + [eos, eos]
        assert got_labels == [IGNORE] * (len(whole) + 1) + [eos]


def test_rewards_are_written_per_key_beside_the_conversations(tmp_path, tokenizer_folder, hf):
    rows = [{"chosen": SINGLE, "rejected": SYSTEM, "score": 0.75, "good": True},
            {"chosen": MULTI, "rejected": ENDS_WITH_USER, "score": -2, "good": 0}]
    src = _write(tmp_path / "pairs.jsonl", rows)
    for name, options, expected in [("score", ChatOptions(reward_key="score"), [[0.75], [-2.0]]),
                                    ("good", ChatOptions(reward_key="good", binary_reward=True), [[1.0], [-1.0]])]:
        prefix = tmp_path / name
        preprocess_chat([str(src)], str(prefix), tokenizer_folder, jsonl_keys=["chosen", "rejected"], options=options)
        for key in ("chosen", "rejected"):
            rewards, dtype = _read(f"{prefix}_{key}_reward_document")
            assert rewards == expected and dtype == numpy.float32
            tokens, _ = _read(f"{prefix}_{key}_document")
            labels, _ = _read(f"{prefix}_{key}_label_document")
            assert [(t, l) for t, l in zip(tokens, labels)] == [_expected(hf, row[key]) for row in rows]


def test_any_worker_count_writes_identical_files(tmp_path, tokenizer_folder):
    conversations = [CONVERSATIONS[i % 4] for i in range(40)]
    src = _write(tmp_path / "chats.jsonl", [{"conversation": c, "r": i} for i, c in enumerate(conversations)])
    outputs = {}
    for workers in (1, 2):
        prefix = tmp_path / f"w{workers}"
        result = preprocess_chat([str(src)], str(prefix), tokenizer_folder, workers=workers, chunk_records=3,
                                 options=ChatOptions(reward_key="r"))
        assert result.documents == 40
        outputs[workers] = {path.name.split("_", 1)[1]: path.read_bytes()
                            for path in sorted(tmp_path.glob(f"w{workers}_*"))}
    assert len(outputs[1]) == 6  # tokens, labels, rewards: .bin and .idx each
    assert outputs[1] == outputs[2]


@pytest.mark.parametrize(
    "line, reason",
    [
        ({"conversation": [{"content": "no role"}]}, "key 'conversation' message 1 has no 'role'"),
        ({"conversation": {"role": "user", "content": "hi"}},
         "key 'conversation' is dict, expected a list of {role, content} messages"),
        ({"conversation": []}, "key 'conversation' is an empty conversation"),
        ({"messages": SINGLE}, "missing key 'conversation'"),
    ],
    ids=["no-role", "not-a-list", "empty", "missing-key"],
)
def test_a_malformed_record_is_one_line_with_file_and_line_and_nothing_is_written(
    tmp_path, tokenizer_folder, capsys, line, reason
):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "chat_tool", REPO / "tools" / "datasets" / "preprocess_data_with_chat_template.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    src = _write(tmp_path / "chats.jsonl", [{"conversation": SINGLE}, line, {"conversation": MULTI}])
    with pytest.raises(SystemExit) as exit_info:
        tool.main(["--input", str(src), "--output-prefix", str(tmp_path / "out"), "--tokenizer-path",
                   tokenizer_folder, "--workers", "2", "--no-progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"{src}:2: {reason}" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chats.jsonl"]


def test_template_that_rewrites_earlier_turns_is_refused(tmp_path, hf):
    # A template that puts the system prompt into the last user turn: turn-by-turn slicing would be wrong.
    hf_copy = tmp_path / "tok"
    hf.save_pretrained(str(hf_copy))
    template = ("{% for m in messages %}{% if m['role'] != 'system' %}<|im_start|>{{ m['role'] }}\n"
                "{% if loop.last and messages[0]['role'] == 'system' %}{{ messages[0]['content'] }} {% endif %}"
                "{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}")
    (hf_copy / "chat_template.jinja").write_text(template)
    with pytest.raises(UserError, match=r"chats.jsonl:1: key 'conversation': message 3: the chat template renders"):
        _run(tmp_path, str(hf_copy), conversations=[SYSTEM])


def test_cli_flags_and_unusable_tokenizer_folders(tmp_path, tokenizer_folder, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "chat_tool", REPO / "tools" / "datasets" / "preprocess_data_with_chat_template.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    a = _write(tmp_path / "a.jsonl", [{"messages": SINGLE}])
    b = _write(tmp_path / "b.jsonl", [{"messages": MULTI}])
    tool.main(["--input", f"{a},{b}", "--output-prefix", str(tmp_path / "sft"), "--tokenizer-path", tokenizer_folder,
               "--jsonl-keys", "messages", "--only-last", "--num-docs", "2", "--log-interval", "1",
               "--dataset-impl", "mmap", "--no-progress"])
    assert "2 conversations" in capsys.readouterr().out
    assert len(_read(tmp_path / "sft_messages_label_document")[0]) == 2
    # compressed inputs give the same files
    import gzip

    import zstandard

    rows = b.read_bytes()
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(rows))
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(rows))
    for name in ("b.jsonl", "b.jsonl.gz", "b.jsonl.zst"):
        tool.main(["--input", str(tmp_path / name), "--output-prefix", str(tmp_path / name.replace(".", "-")),
                   "--tokenizer-path", tokenizer_folder, "--jsonl-keys", "messages", "--no-progress"])
    for kind in ("document", "label_document"):
        files = [(tmp_path / f"{name.replace('.', '-')}_messages_{kind}.bin").read_bytes()
                 for name in ("b.jsonl", "b.jsonl.gz", "b.jsonl.zst")]
        assert files[0] == files[1] == files[2]
    no_template = tmp_path / "plain"
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(tokenizer_folder)
    plain.chat_template = None
    plain.save_pretrained(str(no_template))
    (no_template / "chat_template.jinja").unlink(missing_ok=True)
    for args, message in [
        (["--tokenizer-path", str(no_template)], f"--tokenizer-path {no_template}: the tokenizer has no chat template"),
        (["--tokenizer-path", str(tmp_path / "none")], f"--tokenizer-path {tmp_path / 'none'}: no such folder"),
        (["--tokenizer-path", tokenizer_folder, "--dataset-impl", "lazy"], "--dataset-impl lazy: only mmap is written here"),
        (["--tokenizer-path", tokenizer_folder, "--jsonl-keys", "c", "c_label"], "'c_label' would name the same"),
    ]:
        with pytest.raises(SystemExit):
            tool.main(["--input", str(a), "--output-prefix", str(tmp_path / "bad"), "--no-progress"] + args)
        assert message in capsys.readouterr().err
    assert not list(tmp_path.glob("bad*"))
