"""Passkey retrieval, the long-context check of Mohtashami & Jaggi (2023, "Landmark Attention") that YaRN,
Position Interpolation and LongLoRA report: a five-digit pass key hidden at a chosen depth in filler text,
asked for at the end. `write_passkey_tasks` writes lm-eval task folders (YAML + jsonl), offline and
deterministically: the same tokenizer, lengths, depths, count and seed give the same bytes.

    prompt = INTRO + FILLER x before + NEEDLE(key) + FILLER x after + QUESTION      (then " " + the key)

`before` is `depth` of all the filler units (depth 0: the key right after the intro; 1: right before the
question); `before + after` is the largest number of units for which prompt + " " + key is at most `length`
tokens of the given tokenizer (encoded as evaluation encodes: no special tokens), so a model whose
max_length is `length` sees all of it. Each record stores the unit counts and the strings (the filler is
written once per record and repeated by the task's Jinja template), so a 16k-token prompt costs ~0.5 kB.

Scored by loglikelihood (`multiple_choice`): the key against `distractors` other five-digit numbers, `acc`
(chance 1 / (1 + distractors)). With `generate` a second task per length scores the greedy digits by exact match
(`passkey_gen_*`), as the paper reads it.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import yaml

# The prompt of Mohtashami & Jaggi (2023), as YaRN's and LongLoRA's passkey scripts use it.
INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.")
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
LENGTHS = (1024, 4096, 8192, 16384)


@dataclass(frozen=True)
class Sample:
    key: str
    choices: list[str]
    answer: int
    depth: float
    before: int
    after: int

    def prompt(self) -> str:
        return INTRO + FILLER * self.before + NEEDLE.format(key=self.key) + FILLER * self.after + QUESTION

    def record(self, length: int, tokens: int) -> dict:
        return {"intro": INTRO, "filler": FILLER, "needle": NEEDLE.format(key=self.key), "question": QUESTION,
                "before": self.before, "after": self.after, "depth": self.depth, "length": length,
                "tokens": tokens, "passkey": self.key, "choices": self.choices, "answer": self.answer}


def task_name(length: int, generate: bool = False) -> str:
    """passkey_1k for 1024, passkey_300 for 300 (passkey_gen_... for the generation task)."""
    size = f"{length // 1024}k" if length % 1024 == 0 else str(length)
    return f"passkey_gen_{size}" if generate else f"passkey_{size}"


def make_samples(encode, length: int, depths=DEPTHS, per_depth: int = 5, distractors: int = 9,
                 seed: int = 0) -> list[tuple[Sample, int]]:
    """(sample, prompt tokens) for each depth x per_depth; `encode(str) -> list[int]` is the model's tokenizer."""
    rng = random.Random(f"passkey-{seed}-{length}")  # a str seed: the same stream on every Python
    out = []
    for depth in depths:
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth {depth} is not in [0, 1]")
        for _ in range(per_depth):
            keys = rng.sample(range(10_000, 100_000), distractors + 1)
            key = str(keys[0])
            choices = sorted(str(k) for k in keys)
            units = _units_that_fit(encode, length, key)
            before = round(depth * units)
            sample = Sample(key, choices, choices.index(key), depth, before, units - before)
            out.append((sample, len(encode(sample.prompt()))))
    return out


def _units_that_fit(encode, length: int, key: str) -> int:
    """The most filler units for which prompt + ' ' + key is at most `length` tokens. The estimate counts the
    parts apart; the full encoding then decides (so a merge across a unit boundary is counted as the model
    will see it): a few encodings a sample instead of a bisection's twenty."""
    def total(units):
        return len(encode(Sample(key, [], 0, 0.0, 0, units).prompt() + " " + key))

    fixed, unit = total(0), len(encode(FILLER))
    if fixed > length:
        raise ValueError(f"length {length}: the prompt without filler ({fixed} tokens) is already longer")
    units = max(0, (length - fixed) // unit)
    while units > 0 and total(units) > length:
        units -= 1
    while total(units + 1) <= length:
        units += 1
    return units


def task_yaml(name: str, data_file: str, generate: bool) -> dict:
    text = "{{intro}}{{filler * before}}{{needle}}{{filler * after}}{{question}}"
    if generate:
        return {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": data_file}},
                "test_split": "test", "output_type": "generate_until", "doc_to_text": text,
                "doc_to_target": "{{passkey}}", "target_delimiter": " ",
                "generation_kwargs": {"until": ["\n", "."], "max_gen_toks": 8, "do_sample": False},
                "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                                 "regexes_to_ignore": ["\\s", "\\D+$"]}],
                "metadata": {"version": 1.0}}
    return {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": data_file}},
            "test_split": "test", "output_type": "multiple_choice", "doc_to_text": text,
            "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1.0}}


def write_passkey_tasks(encode, out_dir, lengths=LENGTHS, depths=DEPTHS, per_depth: int = 5,
                        distractors: int = 9, seed: int = 0, generate: bool = True, tokenizer_name: str = "") -> list[str]:
    """Write OUT_DIR/passkey_{len}.jsonl + .yaml per length (and passkey_gen_{len}.yaml with `generate`), and a
    group `passkey` (`passkey_gen`) over the lengths. Returns the task names written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = {False: [], True: []}
    header = (f"# Passkey retrieval, written by tools/datasets/make_passkey_task.py (tokenizer {tokenizer_name or '?'}, "
              f"seed {seed}): do not edit, regenerate.\n")
    for length in lengths:
        name = task_name(length)
        lines = [json.dumps(sample.record(length, tokens)) for sample, tokens in
                 make_samples(encode, length, depths, per_depth, distractors, seed)]
        (out / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
        for gen in ((False, True) if generate else (False,)):
            task = task_name(length, gen)
            names[gen].append(task)
            (out / f"{task}.yaml").write_text(header + yaml.safe_dump(task_yaml(task, f"{name}.jsonl", gen),
                                                                      sort_keys=False))
    for gen, group in ((False, "passkey"), (True, "passkey_gen")):
        if names[gen]:
            metric = "exact_match" if gen else "acc"
            body = {"group": group, "task": names[gen],
                    "aggregate_metric_list": [{"metric": metric, "aggregation": "mean", "weight_by_size": True}],
                    "metadata": {"version": 1.0}}
            (out / f"{group}.yaml").write_text(header + yaml.safe_dump(body, sort_keys=False))
    return names[False] + names[True]
