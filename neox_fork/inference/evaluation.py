"""lm-evaluation-harness on our model, offline: `evaluate_model` (an in-memory model, e.g. from the
training loop) and `evaluate_checkpoint` (what eval.py runs).

`NeoxLM` is an lm-eval `LM` that scores exactly as lm-eval's `hf` model does on the exported folder:
the same context/continuation split, left truncation to `max_length`, rolling windows for perplexity,
greedy `generate_until` with the task's stop strings. Only the continuation positions go through the
output head, so multiple-choice scoring never holds [batch, seq, vocab] logits.

Tasks come from YAML folders (`--include-path`, default: the shipped `tasks/`). A YAML's relative
`dataset_kwargs.data_files` are taken relative to the YAML's folder; lm-eval would resolve them against
the working directory, so each YAML is wrapped (`include:` + absolute paths) in a temporary folder.
Nothing is downloaded: entry points call `launch.hub_offline()` before they import this module (and with
it lm-eval), which the Hugging Face libraries read their offline switches from when first imported.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

from neox_fork.checkpoint import store as checkpoint
from neox_fork.parallel import groups as parallel
from neox_fork.errors import UserError
from neox_fork.inference.generation import SamplingParams, generate, load_for_inference

TASKS_DIR = Path(__file__).resolve().parents[2] / "tasks"


class NeoxLM(TemplateLM):
    """Our model and tokenizer as an lm-eval language model (greedy by default, batches of `batch_size`)."""

    def __init__(self, model, tokenizer, batch_size: int = 8, max_length: int | None = None,
                 max_gen_toks: int = 256):
        super().__init__()
        if tokenizer is None:
            raise UserError("evaluation needs a tokenizer: the checkpoint has no tokenizer.json and its config "
                            "names no vocab-file that exists")
        self.model, self.tokenizer_ = model, tokenizer
        self.batch_size = int(batch_size)
        self.max_length = int(max_length or model.shape.max_positions)
        self.max_gen_toks = max_gen_toks
        self.device_ = next(model.parameters()).device

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer_.eod

    @property
    def prefix_token_id(self) -> int:  # lm-eval's hf model uses BOS, which is <|endoftext|> for NeoX too
        return self.tokenizer_.eod

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer_.encode(string)

    def tok_decode(self, ids: list[int]) -> str:
        """Text without special tokens, as lm-eval's hf model decodes generations."""
        backend = getattr(self.tokenizer_, "_tokenizer", None)  # the `tokenizers` object of HFTokenizer
        if backend is not None:
            return backend.decode(list(ids), skip_special_tokens=True)
        return self.tokenizer_.decode([i for i in ids if i != self.eot_token_id])

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of continuation log-probs, continuation is the greedy path) per (key, context, continuation)."""
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        for first in range(0, len(order), self.batch_size):
            rows = order[first : first + self.batch_size]
            inputs, spans = [], []
            for i in rows:
                _, context, continuation = requests[i]
                if not continuation:
                    raise ValueError("empty continuation")
                window = (context + continuation)[-(self.max_length + 1) :][:-1]  # as lm-eval's hf model
                inputs.append(window)
                spans.append((len(window) - len(continuation), len(window), continuation))
            width = max(map(len, inputs))
            tokens = torch.tensor([w + [0] * (width - len(w)) for w in inputs], device=self.device_)
            hidden = self.model.hidden_states(tokens)  # right padding: causal attention never sees it
            picked = torch.cat([hidden[row, start:end] for row, (start, end, _) in enumerate(spans)])
            logprobs = F.log_softmax(self.model.full_logits(picked[None]).float()[0], dim=-1)
            offset = 0
            for i, (start, end, continuation) in zip(rows, spans):
                chunk, offset = logprobs[offset : offset + end - start], offset + end - start
                target = torch.tensor(continuation, device=self.device_)
                greedy = bool((chunk.argmax(dim=-1) == target).all())
                results[i] = (float(chunk.gather(1, target[:, None]).sum()), greedy)
                key = requests[i][0]
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, results[i])
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents over disjoint windows of `max_length`, as lm-eval's hf model."""
        windows, owners = [], []
        for index, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[owner] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Generation until a stop string, EOD or `max_gen_toks`; greedy unless the task asks to sample."""
        outputs: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        eos = self.tokenizer_.decode([self.eot_token_id])
        for indices in groups.values():
            kwargs = normalize_gen_kwargs(requests[indices[0]].args[1], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen_toks = kwargs.pop("max_gen_toks")
            if max_gen_toks >= self.max_length:
                raise UserError(f"task asks for {max_gen_toks} generated tokens; the model's max_length is "
                                f"{self.max_length}")
            sampling = bool(kwargs.get("do_sample", False))
            params = SamplingParams(max_new_tokens=max_gen_toks,
                                    temperature=float(kwargs.get("temperature", 1.0)) if sampling else 0.0,
                                    top_p=float(kwargs.get("top_p", 1.0)), top_k=int(kwargs.get("top_k", 0) or 0),
                                    seed=int(kwargs.get("seed", 0)))
            contexts = [self.tok_encode(requests[i].args[0])[-(self.max_length - max_gen_toks):] for i in indices]
            stops = [s for s in until if s]

            def stop(_, ids):
                return any(s in self.tok_decode(ids) for s in stops)

            produced, _ = generate(self.model, contexts, params, eod=self.eot_token_id,
                                   max_positions=self.max_length, batch_size=self.batch_size, stop=stop)
            for i, ids in zip(indices, produced):
                outputs[i] = postprocess_generated_text(self.tok_decode(ids), until, None)
                self.cache_hook.add_partial("generate_until", requests[i].args, outputs[i])
        return outputs

    def get_model_info(self) -> dict:
        return {"model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                "model_dtype": str(next(self.model.parameters()).dtype), "max_length": self.max_length}


# ---------------------------------------------------------------------- tasks
def offline_task_dir(include_paths: list[Path], into: Path) -> Path:
    """Wrap every YAML of `include_paths` into `into` with its relative data_files made absolute."""
    from lm_eval.tasks._yaml_loader import load_yaml

    for n, root in enumerate(include_paths):
        root = Path(root).resolve()
        if not root.is_dir():
            raise UserError(f"--include-path {root}: not a folder of task YAML files")
        for source in sorted(root.rglob("*.yaml")):
            try:
                cfg = load_yaml(source, resolve_func=False, recursive=True)
            except Exception:  # noqa: BLE001 - not a task YAML lm-eval could read either
                continue
            wrapper: dict[str, Any] = {"include": str(source)}
            kwargs = cfg.get("dataset_kwargs")
            if isinstance(kwargs, dict) and kwargs.get("data_files") is not None:
                wrapper["dataset_kwargs"] = {**kwargs, "data_files": _absolute(kwargs["data_files"], source)}
            target = into / str(n) / source.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(yaml.safe_dump(wrapper, sort_keys=False))
    return into


def _absolute(files, yaml_file: Path):
    if isinstance(files, dict):
        return {split: _absolute(f, yaml_file) for split, f in files.items()}
    if isinstance(files, (list, tuple)):
        return [_absolute(f, yaml_file) for f in files]
    if re.match(r"^[a-z][a-z0-9+]*://", str(files)) or os.path.isabs(str(files)):
        return files
    path = (yaml_file.parent / str(files)).resolve()
    if not any(path.parent.glob(path.name)):
        raise UserError(f"{yaml_file}: data_files entry {files!r} not found (looked for {path})")
    return str(path)


def task_manager(include_path=None, include_defaults: bool = False, workdir: Path | None = None):
    """An lm-eval TaskManager over the (wrapped) include paths; lm-eval's own tasks only when asked."""
    from lm_eval.tasks import TaskManager

    paths = include_path if isinstance(include_path, (list, tuple)) else [include_path or TASKS_DIR]
    wrapped = offline_task_dir([Path(p) for p in paths], Path(workdir))
    return TaskManager(include_path=str(wrapped), include_defaults=include_defaults)


def check_tasks(manager, tasks: list[str], include_path) -> None:
    if not tasks:
        raise UserError("no tasks given: pass --tasks t1,t2 (or eval_tasks in a config)")
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        local = sorted(name for name in manager.all_tasks)
        where = include_path or TASKS_DIR
        raise UserError(f"unknown task(s) {', '.join(unknown)}; available in {where}: {', '.join(local) or 'none'}"
                        " (lm-eval's built-in tasks need --include-defaults and their datasets cached)")


def evaluate_model(model, tokenizer, tasks: list[str], *, include_path=None, num_fewshot: int | None = None,
                   limit: int | float | None = None, batch_size: int = 8, max_length: int | None = None,
                   include_defaults: bool = False) -> dict:
    """Run lm-eval tasks on an in-memory model; returns lm-eval's results (without per-sample logs).

    `result["results"][task]` maps "metric,filter" to values (e.g. "acc,none", "acc_stderr,none").
    At TP=1 call it on one rank; at TP>1 call it on every rank of the tensor-parallel group (they
    compute together; ranks other than 0 get {}). The model's train/eval mode and the RNG states are
    restored afterwards.
    """
    import lm_eval

    lm = NeoxLM(model, tokenizer, batch_size=batch_size, max_length=max_length)
    was_training = model.training
    model.eval()
    try:
        # lm-eval seeds python, numpy and torch; a training run must not see its RNG streams moved
        with tempfile.TemporaryDirectory(prefix="neox_tasks_") as tmp, parallel.preserved_rng():
            manager = task_manager(include_path, include_defaults, Path(tmp))
            check_tasks(manager, list(tasks), include_path)
            out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                          task_manager=manager, log_samples=False, bootstrap_iters=1000,
                                          torch_random_seed=None)
    finally:
        model.train(was_training)
    if out is None:
        return {}
    out.pop("samples", None)
    return json.loads(json.dumps(out, default=lm_utils.handle_non_serializable))


def evaluate_checkpoint(ckpt, tasks: list[str], *, step: int | None = None, include_path=None,
                        num_fewshot: int | None = None, limit: int | float | None = None, batch_size: int = 8,
                        max_length: int | None = None, output: str | os.PathLike | None = None,
                        dtype: str = "fp32", include_defaults: bool = False, trust: bool = False,
                        tp: int | None = None) -> tuple[dict, Path | None]:
    """Evaluate a checkpoint (any TP size, merged into one process); results go to `output` or to
    CKPT/eval/results_stepN.json. Returns (results, path written).

    With `tp` (every launched rank calls it), the ranks form tensor-parallel groups of `tp` and the group of
    global rank 0 evaluates; other ranks return ({}, None)."""
    folder = checkpoint.resolve(ckpt, step)
    model, config, tokenizer = load_for_inference(folder, dtype=dtype, tp_cooperate=tp is not None, trust=trust,
                                                  tp=tp)
    if tokenizer is None:
        raise UserError(f"checkpoint {folder} has no tokenizer.json and its config names no vocab-file that "
                        "exists; evaluation needs the tokenizer the model was trained with")
    results = {}
    if tp is None or parallel.dp_rank() == 0:
        results = evaluate_model(model, tokenizer, tasks, include_path=include_path, num_fewshot=num_fewshot,
                                 limit=limit, batch_size=batch_size, max_length=max_length,
                                 include_defaults=include_defaults)
    if tp is not None:
        torch.distributed.barrier()
        if torch.distributed.get_rank() != 0:
            return {}, None
    step = checkpoint.folder_step(folder)
    results["checkpoint"] = {"path": str(folder), "step": step}
    if output is None:
        name = f"results_step{step}.json" if step is not None else "results.json"
        output = (folder.parent if step is not None else folder) / "eval" / name
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.write_atomic(output, json.dumps(results, indent=2))
    return results, output


def results_table(results: dict) -> str:
    """A model-card markdown table: task, n-shot, metric, value, stderr."""
    lines = ["| Task | n-shot | Metric | Value | Stderr |", "|---|---:|---|---:|---:|"]
    for task, metrics in sorted(results.get("results", {}).items()):
        shots = results.get("n-shot", {}).get(task, "")
        for key, value in metrics.items():
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            name = metric if filt == "none" else f"{metric} ({filt})"
            err = f"{stderr:.4f}" if isinstance(stderr, (int, float)) else "N/A"
            lines.append(f"| {task} | {shots} | {name} | {value:.4f} | {err} |")
    return "\n".join(lines)
