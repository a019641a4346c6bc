#!/usr/bin/env python
"""Load an exported Hugging Face folder with transformers and print a sampled continuation.

The demo's last step: proof that the export is an ordinary StableLmForCausalLM. With --chat the prompt is a
user turn: the exported tokenizer's chat template renders it (apply_chat_template) and only the reply is printed
(scripts/sft_demo.sh's last step).
"""

import argparse

from neox_fork.errors import UserError, exit_on_user_error


@exit_on_user_error
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("hf_dir")
    p.add_argument("--prompt", default="def fibonacci(n):\n    \"\"\"Return")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.75, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action="store_true", help="the prompt is a user turn of a chat (the folder's chat "
                                                      "template); print only the reply")
    args = p.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(args.hf_dir)
        model = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32)
    except OSError as err:
        raise UserError(f"{args.hf_dir}: not a loadable Hugging Face folder ({str(err).splitlines()[0]})") from None
    torch.manual_seed(args.seed)
    if args.chat:
        if not tokenizer.chat_template:
            raise UserError(f"{args.hf_dir}: its tokenizer has no chat template (export a checkpoint trained on chat "
                            "data, see docs/post-training.md)")
        inputs = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)
    else:
        inputs = tokenizer(args.prompt, return_tensors="pt")
    sampling = dict(do_sample=True, temperature=args.temperature, top_p=args.top_p) if args.temperature > 0 else \
        dict(do_sample=False, temperature=None, top_p=None)
    out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.eos_token_id, **sampling)
    if args.chat:
        print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
        return
    print(f"{type(model).__name__} from {args.hf_dir}:")
    print(tokenizer.decode(out[0], skip_special_tokens=True))


if __name__ == "__main__":
    main()
