"""The text-generation keys mean what upstream's generate.py makes of them (no model needed): greedy only when
temperature, top_k and top_p are all 0, top_p 0 is no filter, prompts split at prompt_end with blanks dropped,
unconditional contexts are empty, and each bad value or missing file is one line naming the key."""

import pytest

from neox_fork.config.loading import from_dict
from neox_fork.errors import UserError
from neox_fork.inference.generation import config_prompts, config_sampling, sample_record


def sampling(**keys):
    p = config_sampling(from_dict(keys))
    return p.max_new_tokens, p.temperature, p.top_k, p.top_p


def test_sampling_keys_map_to_upstreams_rules():
    assert sampling() == (64, 0.0, 0, 1.0)  # upstream's defaults: greedy, 64 tokens
    assert sampling(temperature=0.0, top_k=5) == (64, 1.0, 5, 1.0)  # top_k alone samples, logits unscaled
    assert sampling(temperature=0.0, top_p=0.9) == (64, 1.0, 0, 0.9)
    assert sampling(temperature=0.7, maximum_tokens=9) == (9, 0.7, 0, 1.0)  # top_p 0: no nucleus filter


def test_prompts_split_at_prompt_end_and_unconditional_contexts_are_empty(tmp_path):
    (tmp_path / "in.txt").write_text("  first one \n\n\nsecond|third\n|  |last")
    assert config_prompts(from_dict(dict(text_gen_type="input-file", sample_input_file=str(tmp_path / "in.txt"),
                                         prompt_end="|"))) == ["first one \n\n\nsecond", "third", "last"]
    assert config_prompts(from_dict(dict(text_gen_type="input-file", sample_input_file=str(tmp_path / "in.txt")))) \
        == ["first one", "second|third", "|  |last"]
    assert config_prompts(from_dict(dict(text_gen_type="unconditional", num_samples=3))) == ["", "", ""]


def test_record_counts_text_without_the_final_eod():
    class Chars:
        def decode(self, ids):
            return "".join(chr(96 + i) for i in ids)

    done = sample_record("ctx", [1, 2, 0], Chars(), 0, 1.5)
    assert done == {"context": "ctx", "text": "ab", "length": 2, "finished": True, "message": None,
                    "duration_seconds": 1.5}
    cut = sample_record("", [3, 4, 5], Chars(), 0, 2)
    assert (cut["text"], cut["length"], cut["finished"], cut["message"]) == ("cde", 3, False, None)
    empty = sample_record("x", [0], Chars(), 0, 1)
    assert (empty["text"], empty["length"], empty["finished"]) == (None, 0, True) and "end-of-document" in empty["message"]


@pytest.mark.parametrize("keys, message", [
    (dict(top_p=1.5), "top_p 1.5 must be in [0, 1]"),
    (dict(temperature=-1.0), "temperature -1.0 must be >= 0"),
    (dict(maximum_tokens=0), "maximum_tokens 0 must be at least 1"),
    (dict(num_samples=0), "num_samples 0 must be at least 1"),
])
def test_bad_sampling_values_are_one_line(keys, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        config_sampling(from_dict(keys))


def test_input_file_problems_are_one_line(tmp_path):
    with pytest.raises(UserError, match="needs sample_input_file"):
        config_prompts(from_dict(dict(text_gen_type="input-file")))
    with pytest.raises(UserError, match="missing.txt: no such file"):
        config_prompts(from_dict(dict(text_gen_type="input-file", sample_input_file=str(tmp_path / "missing.txt"))))
    (tmp_path / "blank.txt").write_text("\n \n")
    with pytest.raises(UserError, match="holds no prompts"):
        config_prompts(from_dict(dict(text_gen_type="input-file", sample_input_file=str(tmp_path / "blank.txt"))))
