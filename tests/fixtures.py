"""A throwaway teacher (random tiny Qwen3 + a small BPE tokenizer) and data, built in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import torch

CORPUS = Path(__file__).resolve().parents[1] / "assets" / "corpus"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def conversations(n: int, seed: int) -> list[dict]:
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randrange(10), rng.randrange(10)
        out.append({"messages": [{"role": "system", "content": "Answer briefly."},
                                 {"role": "user", "content": f"What is {a} plus {b}?"},
                                 {"role": "assistant", "content": f"{a + b}."}]})
    return out


def _paragraphs() -> list[str]:
    text = "\n\n".join(p.read_text() for p in sorted(CORPUS.glob("*.txt"))[:2])
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def make_tiny_assets(root: Path, vocab_size: int = 384, num_layers: int = 4) -> dict:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    root.mkdir(parents=True, exist_ok=True)
    paragraphs = _paragraphs()
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(paragraphs, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tokenizer.chat_template = CHATML
    torch.manual_seed(0)
    teacher = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=2048))
    teacher.save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    split = int(len(paragraphs) * 0.9)
    for name, part in (("train.jsonl", paragraphs[:split]), ("heldout.jsonl", paragraphs[split:])):
        (root / name).write_text("".join(json.dumps({"text": p}) + "\n" for p in part))
    long_docs = ["\n\n".join(paragraphs[i::3]) for i in range(3)]  # three long documents
    (root / "long.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in long_docs))
    for name, n, seed in (("chat.jsonl", 64, 0), ("chat_heldout.jsonl", 8, 1)):
        (root / name).write_text("".join(json.dumps(c) + "\n" for c in conversations(n, seed)))
    return {"teacher": root / "teacher", "train": root / "train.jsonl", "heldout": root / "heldout.jsonl",
            "chat": root / "chat.jsonl", "chat_heldout": root / "chat_heldout.jsonl", "long": root / "long.jsonl"}


def tiny_pipeline_config(assets: dict, output_dir: Path, stages=("select", "init", "align"), steps: int = 6,
                         **overrides):
    from factory.config.schema import (AlignConfig, CheckpointConfig, DataConfig, DistillConfig, EvalConfig,
                                       LongContextConfig, ModelConfig, PrimeConfig, TrainStageConfig)

    train = dict(steps=steps, batch_size=2, log_every=1, plot=False)
    cfg = PrimeConfig(
        recipe="test", stages=list(stages), output_dir=str(output_dir), threads=1,
        model=ModelConfig(path=str(assets["teacher"])),
        data=DataConfig(train_files=[str(assets["train"])], heldout_files=[str(assets["heldout"])], seq_len=64,
                        chat_files=[str(assets["chat"])], chat_heldout_files=[str(assets["chat_heldout"])]),
        align=AlignConfig(loss="layerwise", **train), distill=DistillConfig(**train),
        sft=TrainStageConfig(trainable="all", **train),
        longctx=LongContextConfig(trainable="gdn+norms+attention", seq_len=128, rope_theta=20000.0,
                                  max_position_embeddings=4096, data_files=[str(assets["long"])], **train),
        eval=EvalConfig(heldout_rows=4, retrieval_distances=[16], retrieval_samples=2, batch_size=2,
                        chat_prompts=3, chat_max_new_tokens=4),
        checkpoint=CheckpointConfig(every_steps=0, every_minutes=0))
    for key, value in overrides.items():
        section, _, field = key.partition(".")
        setattr(getattr(cfg, section), field, value) if field else setattr(cfg, section, value)
    return cfg
