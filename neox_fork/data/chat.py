"""Chat conversations into token ids and loss labels through a Hugging Face chat template, with the
ids GPT-NeoX's `tools/datasets/preprocess_data_with_chat_template.py` writes.

A record holds, under each `--jsonl-keys` key, a conversation: a list of `{"role", "content"}`
messages. It becomes two aligned documents: the token ids, and the labels (a token's id where that
token is a target, `IGNORE_INDEX` where it is not). A sample trains on input `tokens[:-1]` against
targets `labels[1:]`.

* Each turn's tokens are what the template adds when that turn is rendered after the ones before it
  (the template applied to messages 1..i+1 minus its rendering of messages 1..i); when the next turn
  is the generation role's, the generation prompt is rendered with this turn, so it is never a target.
* Turns of the generation role are targets, all others are masked; `only_last` masks every turn but
  the last. The tokenizer's end-of-sequence token closes the conversation, a target when the last
  label is one.
* `no_mask`: the whole conversation as the template renders it, every token a target, no
  end-of-sequence token added.
* `for_rm` (reward models): the rendered conversation plus two end-of-sequence tokens; only the last
  one is a target (the reward head reads the position that predicts it).
* `reward_key`: a number per record (`binary_reward`: the JSON value's truth, as +1 / -1) written as
  a one-value document beside each key's conversation.

Labels are stored as int32 (so -100 stays -100), rewards as float32, tokens in the same element type
as `neox_fork.data.preprocess` picks for the vocabulary. Reading, workers and all-or-nothing writing
are `neox_fork.data.pipeline`'s.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy

from neox_fork.data.pipeline import (
    EncodedChunk,
    PreprocessResult,
    check_run_options,
    flatten,
    make_output_folder,
    run,
)
from neox_fork.data.preprocess import document_prefix, token_dtype
from neox_fork.data.readers import JSONL_SUFFIXES, BadRecord, Record, expand_inputs, parse_object
from neox_fork.data.tokenizer import EOD_TOKEN, HFTokenizer
from neox_fork.errors import UserError

IGNORE_INDEX = -100
LABEL_DTYPE = numpy.int32
REWARD_DTYPE = numpy.float32
DEFAULT_KEY = "conversation"


@dataclass(frozen=True)
class ChatOptions:
    """How conversations become labels (upstream's flags of the same names)."""

    generation_role: str = "assistant"
    only_last: bool = False
    no_mask: bool = False
    for_rm: bool = False
    reward_key: str | None = None
    binary_reward: bool = False


def load_chat_tokenizer(path: str, what: str = "--tokenizer-path"):
    """The transformers tokenizer in folder `path`, which must carry a chat template; `what` names the
    folder in errors."""
    if not os.path.isdir(path):
        raise UserError(f"{what} {path}: no such folder (expected a Hugging Face tokenizer folder)")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as err:  # transformers raises OSError, ValueError, or the Rust side's bare Exception
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"{what} {path}: cannot load a tokenizer ({first_line})") from None
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"{what} {path}: the tokenizer has no chat template "
            "(chat_template.jinja, or chat_template in tokenizer_config.json)"
        )
    return tokenizer


def check_conversation(messages: Any, key: str) -> list[dict]:
    """`messages` if it is a non-empty list of messages with string role and content, else `BadRecord`."""
    if not isinstance(messages, list):
        raise BadRecord(f"key {key!r} is {type(messages).__name__}, expected a list of {{role, content}} messages")
    if not messages:
        raise BadRecord(f"key {key!r} is an empty conversation")
    for number, message in enumerate(messages, start=1):
        where = f"key {key!r} message {number}"
        if not isinstance(message, dict):
            raise BadRecord(f"{where} is {type(message).__name__}, expected an object with role and content")
        for field in ("role", "content"):
            if field not in message:
                raise BadRecord(f"{where} has no {field!r}")
            if not isinstance(message[field], str):
                raise BadRecord(f"{where}: {field!r} is {type(message[field]).__name__}, expected a string")
    return messages


def _render(tokenizer, messages: Sequence[dict], add_generation_prompt: bool = False) -> list[int]:
    from jinja2 import TemplateError

    try:
        ids = tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
        )
    except TemplateError as err:
        raise BadRecord(f"the chat template fails on it ({str(err).splitlines()[0] if str(err) else err})") from None
    return list(ids)


_NO_TOKENS = "the chat template renders the conversation as no tokens"


def build_chat(messages: Sequence[dict], tokenizer, options: ChatOptions) -> tuple[list[int], list[int]]:
    """(token ids, labels) of one conversation; see the module docstring."""
    eos = tokenizer.eos_token_id
    if options.no_mask or options.for_rm:
        tokens = _render(tokenizer, messages)
        if not tokens:
            raise BadRecord(_NO_TOKENS)
        if options.no_mask:
            return tokens, list(tokens)
        return tokens + [eos, eos], [IGNORE_INDEX] * (len(tokens) + 1) + [eos]
    tokens: list[int] = []
    labels: list[int] = []
    last = len(messages) - 1
    for i, message in enumerate(messages):
        add_prompt = i < last and messages[i + 1]["role"] == options.generation_role
        rendered = _render(tokenizer, messages[: i + 1], add_prompt)
        if rendered[: len(tokens)] != tokens:
            raise BadRecord(
                f"message {i + 1}: the chat template renders messages 1..{i + 1} not as its rendering of "
                f"messages 1..{i} plus more, so the turn's tokens are not defined (a template that rewrites "
                "earlier turns cannot be masked per turn)"
            )
        turn = rendered[len(tokens):]
        tokens.extend(turn)
        trained = message["role"] == options.generation_role and (not options.only_last or i == last)
        labels.extend(turn if trained else [IGNORE_INDEX] * len(turn))
    if not tokens:
        raise BadRecord(_NO_TOKENS)
    if eos is not None:
        tokens.append(eos)
        labels.append(eos if labels[-1] != IGNORE_INDEX else IGNORE_INDEX)
    return tokens, labels


def parse_reward(obj: dict, options: ChatOptions) -> float:
    key = options.reward_key
    if key not in obj:
        raise BadRecord(f"missing reward key {key!r}")
    value = obj[key]
    if options.binary_reward:
        return 1.0 if value else -1.0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRecord(
            f"reward key {key!r} is {type(value).__name__}, expected a number (or give --binary-reward)"
        )
    return float(value)


def _files_per_key(options: ChatOptions) -> int:
    return 3 if options.reward_key is not None else 2  # tokens, labels (, rewards)


def output_dtypes(num_ids: int, num_keys: int, options: ChatOptions) -> list[type[numpy.number]]:
    """Element types of the outputs, in `chat_outputs`' order."""
    return [token_dtype(num_ids), LABEL_DTYPE, REWARD_DTYPE][: _files_per_key(options)] * num_keys


class ChatChunkEncoder:
    """Built in each worker: encodes a chunk of records into, per key, tokens, labels (and rewards)."""

    def __init__(self, tokenizer_path: str, keys: Sequence[str], options: ChatOptions):
        self.tokenizer = load_chat_tokenizer(tokenizer_path)
        self.keys = list(keys)
        self.options = options
        self.dtypes = output_dtypes(len(self.tokenizer), len(self.keys), options)

    def encode_record(self, record: Record) -> list[list]:
        obj = parse_object(record)
        documents: list[list] = []
        reward = parse_reward(obj, self.options) if self.options.reward_key is not None else None
        for key in self.keys:
            if key not in obj:
                raise BadRecord(f"missing key {key!r}")
            messages = check_conversation(obj[key], key)
            try:
                documents.extend(build_chat(messages, self.tokenizer, self.options))
            except BadRecord as err:
                raise BadRecord(f"key {key!r}: {err}") from None
            if reward is not None:
                documents.append([reward])
        return documents

    def __call__(self, chunk: Sequence[Record]) -> EncodedChunk:
        columns: list[list[list]] = [[] for _ in self.dtypes]
        bad = []
        for record in chunk:
            try:
                documents = self.encode_record(record)
            except BadRecord as err:
                bad.append((record.source, record.line, str(err)))
                continue
            for column, document in zip(columns, documents):
                column.append(document)
        arrays, lengths = [], []
        for column, dtype in zip(columns, self.dtypes):
            flat, doc_lengths = flatten(column, dtype)
            arrays.append(flat)
            lengths.append(doc_lengths)
        return EncodedChunk(
            arrays=arrays,
            lengths=lengths,
            bad=bad,
            empty=0,
            records=len(chunk),
            input_bytes=sum(len(record.raw) for record in chunk),
        )


def chat_outputs(output_prefix: str, keys: Sequence[str], options: ChatOptions) -> list[str]:
    """Path prefixes written, per key: PREFIX_{key}_document, PREFIX_{key}_label_document and, with a
    reward key, PREFIX_{key}_reward_document."""
    suffixes = ["", "_label", "_reward"][: _files_per_key(options)]
    return [document_prefix(output_prefix, key + suffix) for key in keys for suffix in suffixes]


def _check_keys(keys: Sequence[str], options: ChatOptions) -> None:
    if not keys or len(set(keys)) != len(keys):
        raise UserError(f"--jsonl-keys {' '.join(keys)}: give one or more distinct keys")
    for key in keys:
        for suffix in ("_label", "_reward") if options.reward_key is not None else ("_label",):
            if key + suffix in keys:
                raise UserError(
                    f"--jsonl-keys {' '.join(keys)}: {key + suffix!r} would name the same files as "
                    f"{key!r}'s {suffix[1:]}s; rename that key"
                )


def preprocess_chat(
    inputs: Sequence[str],
    output_prefix: str,
    tokenizer_path: str,
    *,
    jsonl_keys: Sequence[str] = (DEFAULT_KEY,),
    options: ChatOptions = ChatOptions(),
    workers: int = 1,
    max_bad_fraction: float = 0.01,
    progress: bool = False,
    num_docs: int | None = None,
    log_interval: int = 100,
    chunk_bytes: int = 1 << 20,
    chunk_records: int = 4096,
) -> PreprocessResult:
    """Write each key's token ids and labels (and rewards) for the conversations in `inputs`."""
    check_run_options(workers, max_bad_fraction)
    keys = list(jsonl_keys)
    _check_keys(keys, options)
    if log_interval < 1:
        raise UserError(f"--log-interval {log_interval}: must be at least 1")
    if options.binary_reward and options.reward_key is None:
        raise UserError("--binary-reward needs --reward-key (the key holding each record's reward)")
    files = expand_inputs(inputs)
    txt = [path for path in files if not path.endswith(JSONL_SUFFIXES)]
    if txt:
        raise UserError(f"--input {txt[0]}: conversations come in .jsonl, .jsonl.gz or .jsonl.zst files")
    tokenizer = load_chat_tokenizer(tokenizer_path)
    if options.for_rm and not options.no_mask and tokenizer.eos_token_id is None:
        raise UserError(f"--tokenizer-path {tokenizer_path}: --for-rm needs a tokenizer with an eos_token")
    make_output_folder(output_prefix)
    per_key = _files_per_key(options)
    return run(
        files,
        chat_outputs(output_prefix, keys, options),
        output_dtypes(len(tokenizer), len(keys), options),
        ChatChunkEncoder,
        (tokenizer_path, keys, options),
        token_outputs=range(0, per_key * len(keys), per_key),
        workers=workers,
        max_bad_fraction=max_bad_fraction,
        progress=progress,
        progress_total=num_docs,
        progress_every=log_interval,
        chunk_bytes=chunk_bytes,
        chunk_records=chunk_records,
    )


def write_chat_tokenizer(vocab_file: str, chat_template_file: str, output_dir: str, eos_token: str = EOD_TOKEN) -> str:
    """A transformers tokenizer folder (for --tokenizer-path) from a tokenizer.json and a Jinja chat
    template file, `eos_token` its end-of-sequence token; written whole or not at all."""
    from transformers import PreTrainedTokenizerFast

    from neox_fork.checkpoint.store import atomic_folder

    try:
        template = Path(chat_template_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"--chat-template {chat_template_file}: cannot read it ({err})") from None
    if HFTokenizer(vocab_file).token_to_id(eos_token) is None:
        raise UserError(f"--vocab-file {vocab_file}: has no token {eos_token!r} to end a turn with")
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=vocab_file, eos_token=eos_token, chat_template=template)
    with atomic_folder(output_dir) as folder:
        tokenizer.save_pretrained(str(folder))
    return output_dir


# ---------------------------------------------------------------------- chatting with a trained model
def end_of_turn_ids(tokenizer) -> list[int]:
    """The ids that end the model's turn: the tokenizer's eos_token, and the added token the chat template
    writes right after an assistant message's content (ChatML's `<|im_end|>`, Llama 3's `<|eot_id|>`) when
    that is another one."""
    from jinja2 import TemplateError

    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    marker = "\u2063neox-fork-reply\u2063"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": marker}], tokenize=False)
    except TemplateError:
        return ids
    after = text.split(marker, 1)[1] if isinstance(text, str) and marker in text else ""
    added = [token for token in tokenizer.get_added_vocab() if token and after.startswith(token)]
    if added:
        token_id = tokenizer.convert_tokens_to_ids(max(added, key=len))
        if token_id not in ids:
            ids.append(token_id)
    return ids


def chat_prompt_ids(tokenizer, messages: Sequence[dict]) -> list[int]:
    """The ids of `messages` as the chat template renders them, followed by its generation prompt: what the
    model continues with its reply (the same ids preprocessing gave the turns before a trained reply)."""
    try:
        return _render(tokenizer, messages, add_generation_prompt=True)
    except BadRecord as err:
        raise UserError(str(err)) from None


def checkpoint_chat_tokenizer(source, where: str):
    """The transformers tokenizer (with its chat template) a checkpoint carries: `source` is the checkpoint's
    data.tokenizer.TokenizerSource (checkpoint.tokenizer_of). A checkpoint without one is one line."""
    files = source.chat_files() if source is not None else []
    if not files:
        raise UserError(f"checkpoint {where} carries no chat template: train with vocab_file set to the "
                        "tokenizer.json of the transformers tokenizer folder the chat data was made with "
                        "(preprocess_data_with_chat_template.py --tokenizer-path), so the checkpoint keeps its "
                        "template")
    return load_chat_tokenizer(str(files[0].parent), what="checkpoint tokenizer folder")
