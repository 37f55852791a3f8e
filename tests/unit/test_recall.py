"""factory.eval.recall: recall by task and distance, users' recall files, their validation."""

import json
from pathlib import Path

import pytest
import torch

from factory.config.validate import ConfigError
from factory.eval import recall

VOCAB = 64
TEACHER = Path(__file__).resolve().parents[2] / "assets" / "teacher"


class Tok:
    """Characters as tokens (ids = code point % VOCAB): enough for the scorer, no files needed."""

    pad_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % VOCAB for c in text]}


class Oracle(torch.nn.Module):
    """Logits that put all mass on the true next token (shift=1); shift=0 is off by one."""

    def __init__(self, shift: int = 1):
        super().__init__()
        self.shift = shift

    def forward(self, input_ids):
        nxt = torch.roll(input_ids, -self.shift, dims=1)
        return type("Out", (), {"logits": torch.nn.functional.one_hot(nxt, VOCAB).float()})


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ---- reading and validating recall files


def test_recall_file_is_read_item_by_item_skipping_blank_lines(tmp_path):
    path = write(tmp_path / "r.jsonl", [{"prompt": "Key ab is 12. Key ab is", "answer": " 12"}, "",
                                        {"prompt": "x", "answer": "y", "id": 3}])
    assert recall.read_recall_file(path) == [recall.RecallItem("Key ab is 12. Key ab is", " 12"),
                                             recall.RecallItem("x", "y")]
    recall.validate_recall_files([path, path])


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "p", "answer": "a"}, {"prompt": "p"}], r"line 2: needs a string 'answer' \(keys present: 'prompt'\)"),
    ([{"answer": "a"}], r"line 1: needs a string 'prompt'"),
    ([{"prompt": "p", "answer": 12}], r"line 1: needs a string 'answer'"),
    ([{"prompt": "p", "answer": ""}], r"line 1: empty 'answer'"),
    ([{"prompt": "p", "answer": "  "}], r"line 1: empty 'answer'"),
    (["{not json"], r"line 1: not valid JSON"),
    ([["p", "a"]], r"line 1: expected an object"),
    (["", "  "], r"has no recall items"),
])
def test_bad_recall_file_is_one_error_line_naming_file_and_line(tmp_path, rows, message):
    path = write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ConfigError, match=message) as err:
        recall.validate_recall_files([path])
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert str(err.value).startswith("eval.recall_files: ")


def test_missing_recall_file_is_refused_before_the_others_are_scored(tmp_path):
    good = write(tmp_path / "good.jsonl", [{"prompt": "p", "answer": "a"}])
    with pytest.raises(ConfigError, match=r"eval.recall_files: .*missing.jsonl does not exist"):
        recall.validate_recall_files([good, tmp_path / "missing.jsonl"])


# ---- scoring


def test_oracle_scores_one_and_off_by_one_scores_zero_on_files(tmp_path):
    path = write(tmp_path / "r.jsonl", [{"prompt": "abc", "answer": " 12"}, {"prompt": "zz", "answer": "q"}])
    assert recall.recall_files_accuracy(Oracle(), Tok(), [path]) == {str(path): {"accuracy": 1.0, "items": 2}}
    assert recall.recall_files_accuracy(Oracle(shift=0), Tok(), [path])[str(path)]["accuracy"] == 0.0


def test_file_score_is_greedy_exact_match_of_a_real_model():
    """Items whose answer is the model's own greedy continuation score 1; one changed token scores 0."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    model = Qwen3ForCausalLM(config).eval()
    right, wrong = [], []
    for prompt in ("hello there", "abcdefgh", "Key zo has value"):
        ids = torch.tensor([Tok()(prompt)["input_ids"]])
        out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
        # A char tokenizer whose ids are code points mod VOCAB: chr(64 + id) maps back to id.
        answer = "".join(chr(VOCAB + t) for t in out)
        right.append(recall.RecallItem(prompt, answer))
        wrong.append(recall.RecallItem(prompt, answer[:2] + chr(VOCAB + (out[2] + 1) % VOCAB)))
    assert recall.score_items(model, Tok(), right) == 1.0
    assert recall.score_items(model, Tok(), wrong) == 0.0


def test_recall_by_distance_and_comparison():
    from transformers import AutoTokenizer

    if not (TEACHER / "tokenizer.json").exists():
        pytest.skip("embedded teacher not built")
    tokenizer = AutoTokenizer.from_pretrained(TEACHER)
    vocab = len(tokenizer)

    class Full(torch.nn.Module):
        def forward(self, input_ids):
            nxt = torch.roll(input_ids, -1, dims=1)
            return type("Out", (), {"logits": torch.nn.functional.one_hot(nxt, vocab).float()})

    teacher = recall.recall_by_distance(Full(), tokenizer, [32, 128], 4, seed=0)
    assert teacher == {"kv": {32: 1.0, 128: 1.0}, "passkey": {32: 1.0, 128: 1.0}}
    hybrid = {"kv": {32: 0.5, 128: 0.0}, "passkey": {32: 1.0, 128: 0.25}}
    table = recall.compare(teacher, hybrid)
    assert table["kv"][32] == {"teacher": 1.0, "hybrid": 0.5, "kept": 0.5}
    assert table["passkey"][128]["kept"] == 0.25
    zero = recall.compare({"kv": {32: 0.0}}, {"kv": {32: 0.0}})
    assert zero["kv"][32]["kept"] is None
    text = recall.format_table(table)
    assert "| kv | 32 | 1.00 | 0.50 | 50% |" in text and "| passkey | 128 | 1.00 | 0.25 | 25% |" in text
    assert "n/a" in recall.format_table(zero)
