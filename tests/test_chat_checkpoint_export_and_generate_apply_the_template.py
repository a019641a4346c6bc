"""A checkpoint trained on chat data keeps the chat template of the tokenizer folder its vocab_file lies in;
the Hugging Face export writes it, so transformers' apply_chat_template on the export equals the source folder's
and generation stops at the end-of-turn token; generate.py --chat renders the same prompt, stops there and
prints only the reply (checked against a greedy loop of transformers on the export)."""

import io
import json
import runpy
import shutil
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from conftest import NEOX_TOKENIZER, REPO, tiny_keys
from neox_fork.checkpoint import store as checkpoint
from neox_fork.config.loading import from_dict
from neox_fork.data.chat import write_chat_tokenizer
from neox_fork.checkpoint.hf import export_folder
from neox_fork.model.transformer import build_model

TEMPLATE = REPO / "examples" / "chat" / "chat_template.jinja"
EOD = 0  # <|endoftext|> in GPT-NeoX-20B's tokenizer
# ChatML: turns end with an added <|im_end|>, not with the eos token
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CONVERSATIONS = [
    [{"role": "user", "content": "What colour is the sky in the demo world?"}],
    [{"role": "system", "content": "You answer in one sentence."},
     {"role": "user", "content": "How many moons does the demo world have?"},
     {"role": "assistant", "content": "The demo world has three moons."},
     {"role": "user", "content": "Name them."}],
]


def chatml_folder(path):
    tok = PreTrainedTokenizerFast(tokenizer_file=str(NEOX_TOKENIZER), eos_token="<|endoftext|>", chat_template=CHATML)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.save_pretrained(str(path))
    return path


def chat_checkpoint(tmp_path, tokenizer_folder, seed=0):
    """A random tiny model saved as training saves it, vocab_file in `tokenizer_folder`, which is then moved
    away (a copy stays at tmp_path/reference for comparisons): the checkpoint must not need it."""
    config = from_dict(tiny_keys(vocab_size=None, vocab_file=str(tokenizer_folder / "tokenizer.json")))
    torch.manual_seed(seed)
    model = build_model(config, 50304)
    with torch.no_grad():  # sharper logits than at init, so greedy paths are not ties
        for p in model.parameters():
            p.mul_(4.0 if p.dim() > 1 else 1.0)
    checkpoint.save_model_checkpoint(tmp_path / "ckpt", 3, [checkpoint.model_state(model)], config,
                                     tokenizer_folder / "tokenizer.json")
    shutil.move(str(tokenizer_folder), str(tmp_path / "reference"))
    return tmp_path / "ckpt"


@pytest.mark.parametrize("kind", ["demo", "chatml"])
def test_export_applies_the_source_template_and_stops_at_end_of_turn(one_process, tmp_path, kind):
    source = tmp_path / "chat_tokenizer"
    if kind == "demo":
        write_chat_tokenizer(str(NEOX_TOKENIZER), str(TEMPLATE), str(source))
    else:
        chatml_folder(source)
    ckpt = chat_checkpoint(tmp_path, source)
    step = checkpoint.resolve(ckpt)
    assert (step / "tokenizer_config.json").is_file() and (step / "chat_template.jinja").is_file()

    export_folder(ckpt, tmp_path / "hf")
    exported, reference = AutoTokenizer.from_pretrained(tmp_path / "hf"), AutoTokenizer.from_pretrained(
        tmp_path / "reference")
    for messages in CONVERSATIONS:
        for prompt in (False, True):
            for tokenize in (False, True):
                got = exported.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=tokenize,
                                                   return_dict=False)
                assert got == reference.apply_chat_template(messages, add_generation_prompt=prompt,
                                                            tokenize=tokenize, return_dict=False)
    assert exported.eos_token == "<|endoftext|>"
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    end_of_turn = reference.convert_tokens_to_ids("<|im_end|>")
    assert generation["eos_token_id"] == (EOD if kind == "demo" else [EOD, end_of_turn])
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"] == EOD


def test_a_checkpoint_without_a_chat_template_exports_as_before(one_process, tmp_path):
    source = tmp_path / "plain"
    source.mkdir()
    shutil.copyfile(NEOX_TOKENIZER, source / "tokenizer.json")
    (source / "tokenizer_config.json").write_text("{}")  # a folder, but no chat template
    ckpt = chat_checkpoint(tmp_path, source)
    assert not (checkpoint.resolve(ckpt) / "tokenizer_config.json").exists()
    export_folder(ckpt, tmp_path / "hf")
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").chat_template is None


def greedy(hf, ids, steps):
    """transformers' model, one full forward per token: the argmax continuation of `ids`."""
    ids = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids


def run_generate(capsys, monkeypatch, *args, stdin=""):
    """generate.py's main in this process (as its command line; a subprocess would spend its time importing)."""
    from neox_fork.parallel import groups as parallel

    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    capsys.readouterr()
    try:
        runpy.run_path(str(REPO / "generate.py"))["main"](list(map(str, args)))
    finally:
        parallel.destroy()
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def chatml_checkpoint(tmp_path_factory):
    from neox_fork.parallel import groups as parallel

    tmp_path = tmp_path_factory.mktemp("sftchat_generate")
    parallel.initialize(1)
    try:
        ckpt = chat_checkpoint(tmp_path, chatml_folder(tmp_path / "chat_tokenizer"), seed=1)
        export_folder(ckpt, tmp_path / "hf")
    finally:
        parallel.destroy()
    return ckpt, tmp_path / "hf"


def test_generate_chat_prints_only_the_reply_transformers_computes(chatml_checkpoint, capsys, monkeypatch):
    ckpt, hf_dir = chatml_checkpoint
    tok, hf = AutoTokenizer.from_pretrained(hf_dir), AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    stops = {EOD, tok.convert_tokens_to_ids("<|im_end|>")}
    system, question = "Be brief.", "What colour is the sky in the demo world?"
    prompt = tok.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": question}],
                                     add_generation_prompt=True, tokenize=True, return_dict=False)
    new = greedy(hf, prompt, 12)[len(prompt):]
    first_stop = next((i for i, t in enumerate(new) if t in stops), None)
    expected_ids = new if first_stop is None else new[: first_stop + 1]
    expected = tok.decode([t for t in expected_ids if t not in stops], skip_special_tokens=True).strip()

    out = run_generate(capsys, monkeypatch, "--checkpoint", ckpt, "--chat", "--system", system, "--prompt", question,
                       "--max-new-tokens", 12, "--json")
    # the reply alone: no prompt, no template, no end-of-turn token (plain printing: the interactive test)
    assert json.loads(out.strip().splitlines()[-1]) == {"token_ids": expected_ids, "text": expected}


def test_chat_stops_at_the_end_of_turn_token_and_strips_it(chatml_checkpoint, one_process, monkeypatch):
    """The stop and strip logic with an end-of-turn token the random model does produce: the third distinct
    token of its greedy reply stands for the template's end-of-turn token."""
    import neox_fork.data.chat as chat
    from neox_fork.inference.generation import SamplingParams, chat_replies, load_for_inference

    ckpt, hf_dir = chatml_checkpoint
    tok, hf = AutoTokenizer.from_pretrained(hf_dir), AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    messages = [{"role": "user", "content": "Tell me the colour of the demo world's sky."}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    new = greedy(hf, prompt, 16)[len(prompt):]
    cut = next(i for i in range(2, len(new)) if new[i] not in new[:i])
    monkeypatch.setattr(chat, "end_of_turn_ids", lambda tokenizer: [new[cut]])
    model, _, _ = load_for_inference(ckpt)
    (reply,), _ = chat_replies(model, tok, [messages], SamplingParams(max_new_tokens=16))
    assert reply == {"token_ids": new[: cut + 1], "text": tok.decode(new[:cut], skip_special_tokens=True).strip()}


def test_interactive_chat_keeps_the_conversation(chatml_checkpoint, capsys, monkeypatch):
    ckpt, hf_dir = chatml_checkpoint
    tok, hf = AutoTokenizer.from_pretrained(hf_dir), AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    stops = {EOD, tok.convert_tokens_to_ids("<|im_end|>")}
    out = run_generate(capsys, monkeypatch, "--checkpoint", ckpt, "--chat", "--interactive", "--max-new-tokens", 6,
                       stdin="Hello there.\nAnd the moons?\n").splitlines()
    messages, expected = [], []
    for text in ("Hello there.", "And the moons?"):  # the second turn's prompt holds the first reply
        messages.append({"role": "user", "content": text})
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        new = greedy(hf, prompt, 6)[len(prompt):]
        new = new[: next((i for i, t in enumerate(new) if t in stops), len(new))]
        expected.append(tok.decode(new, skip_special_tokens=True).strip())
        messages.append({"role": "assistant", "content": expected[-1]})
    assert out == expected


def test_chat_needs_a_checkpoint_with_a_template(tmp_path, capsys, monkeypatch):
    from test_generate_matches_transformers import trained_looking_checkpoint

    from neox_fork.parallel import groups as parallel

    parallel.initialize(1)
    try:
        trained_looking_checkpoint(tmp_path / "plain")
    finally:
        parallel.destroy()
    with pytest.raises(SystemExit) as exit_:
        run_generate(capsys, monkeypatch, "--checkpoint", tmp_path / "plain", "--chat", "--prompt", "Hi")
    assert exit_.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "carries no chat template" in err[0] and "vocab_file" in err[0]
