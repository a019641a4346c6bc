"""Command lines of the Hugging Face converters, in our flag spellings and upstream gpt-neox's.

    tools/convert_to_hf.py and tools/ckpts/convert_neox_to_hf.py      -> export_main
        ours: --input-dir --output-dir --dtype --step --trust-checkpoint --peft-adapter (LoRA checkpoints)
        upstream's: --input_dir --config_file --output_dir --precision {auto,fp16,bf16,fp32}
                    --architecture {neox,llama,mistral} --no_save_tokenizer --vocab-is-hf-tokenizer --pad-token-id
    tools/ckpts/convert_hf_llama_to_neox.py                            -> import_main
        ours: --hf-dir --output-dir --tp; upstream's: --model (a local folder here) --model_path --tp --pp

Both spellings of a flag are one option; the work is done by hf.export_folder / hf.import_folder.
"""

from __future__ import annotations

import argparse

from neox_fork.errors import UserError, exit_on_user_error
from neox_fork.checkpoint.safe_unpickle import add_trust_argument

EXPORT_DOC = ("Export a neox_fork or GPT-NeoX checkpoint (any tensor-parallel size) as a Hugging Face folder: "
              "GPTNeoXForCausalLM, LlamaForCausalLM, MistralForCausalLM, StableLmForCausalLM or MixtralForCausalLM "
              "(mixture of experts), whichever computes its architecture, "
              "with the transformers tokenizer files of its tokenizer_type.")
IMPORT_DOC = ("Import a Hugging Face GPTNeoX (Pythia), Llama, Mistral, StableLm or Mixtral folder "
              "(e.g. stabilityai/stablelm-3b-4e1t) "
              "as a neox_fork checkpoint at step 0. Train from it with `load: CKPT_DIR` and `finetune: true`.")


def export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=EXPORT_DOC)
    parser.add_argument("--input-dir", "--input_dir", dest="input_dir", required=True,
                        help="checkpoint folder (with 'latest') or a global_stepN folder")
    parser.add_argument("--output-dir", "--output_dir", dest="output_dir", required=True,
                        help="Hugging Face folder to write")
    parser.add_argument("--config-file", "--config_file", dest="config_file", default=None,
                        help="config of the checkpoint (default: the step folder's config.yml)")
    parser.add_argument("--dtype", "--precision", dest="dtype", choices=["auto", "bf16", "fp16", "fp32"],
                        default=None, help="weight dtype (default and auto: as stored in the checkpoint)")
    parser.add_argument("--architecture", choices=["neox", "llama", "mistral"], default=None,
                        help="upstream's model class choice; here the config decides, and a different one is "
                             "refused (default: the config's)")
    parser.add_argument("--step", type=int, default=None, help="global step to export (default: latest)")
    parser.add_argument("--no-save-tokenizer", "--no_save_tokenizer", dest="no_save_tokenizer",
                        action="store_true", help="write no tokenizer files")
    parser.add_argument("--vocab-is-hf-tokenizer", "--vocab_is_hf_tokenizer", dest="vocab_is_hf_tokenizer",
                        action="store_true",
                        help="the config's vocab_file lies in a transformers tokenizer folder: save that folder's "
                             "tokenizer")
    parser.add_argument("--pad-token-id", "--pad_token_id", dest="pad_token_id", type=int, default=-1,
                        help="pad token id for config.json and the tokenizer (default -1: none)")
    parser.add_argument("--peft-adapter", "--peft_adapter", dest="peft_adapter", default=None,
                        help="a LoRA checkpoint: also write its adapters here as a PEFT folder (adapter_config.json, "
                             "adapter_model.safetensors) for peft.PeftModel.from_pretrained on the base's export; "
                             "--output-dir gets the merged model")
    add_trust_argument(parser)
    return parser


@exit_on_user_error
def export_main(argv=None) -> None:
    from neox_fork.checkpoint.hf import export_folder

    args = export_parser().parse_args(argv)
    out = export_folder(args.input_dir, args.output_dir, None if args.dtype == "auto" else args.dtype, args.step,
                        trust=args.trust_checkpoint, config_file=args.config_file, architecture=args.architecture,
                        save_tokenizer=not args.no_save_tokenizer, tokenizer_is_hf_folder=args.vocab_is_hf_tokenizer,
                        pad_token_id=None if args.pad_token_id == -1 else args.pad_token_id,
                        peft_adapter=args.peft_adapter)
    print(f"wrote {out}" + (f" and the PEFT adapter {args.peft_adapter}" if args.peft_adapter else ""))


def import_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=IMPORT_DOC)
    parser.add_argument("--hf-dir", "--model", dest="hf_dir", required=True,
                        help="local folder with config.json and *.safetensors (upstream's --model may name a hub "
                             "model; nothing downloads here)")
    parser.add_argument("--output-dir", "--model_path", "--model-path", dest="output_dir", required=True,
                        help="checkpoint folder to write")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size to split the weights for")
    parser.add_argument("--pp", type=int, default=0,
                        help="pipe_parallel_size of the written checkpoint: 0 writes GPT-NeoX's sequential layout "
                             "(upstream's only choice), 1 or more its per-layer files")
    return parser


@exit_on_user_error
def import_main(argv=None) -> None:
    from neox_fork.checkpoint.hf import import_folder

    args = import_parser().parse_args(argv)
    if args.pp < 0:
        raise UserError(f"--pp {args.pp}: must be 0 or more")
    out = import_folder(args.hf_dir, args.output_dir, args.tp, extra_config={"pipe_parallel_size": args.pp})
    print(f"wrote {out}")
