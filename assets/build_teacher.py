#!/usr/bin/env python
"""Build the embedded tiny Qwen3 teacher, its tokenizer and the default datasets.

    python assets/build_teacher.py --seed 0 --device cuda --workers 3 --out assets/teacher

Steps: train a byte-level BPE tokenizer on the training plays, write the default
datasets (assets/data/*.jsonl), train a small Qwen3ForCausalLM on corpus windows mixed
with synthetic retrieval documents, then measure held-out loss and retrieval accuracy
by distance and write training_report.json. Everything is drawn from --seed: each step's
rows from (seed, step), so neither --workers nor a resume changes them. On the CPU the run
uses one thread by default, so the same seed gives the same weights on the same machine and
torch version; the defaults are sized for a GPU (about 1.5 minutes of training on an H200).
"""

from __future__ import annotations

import os

# Before torch/tokenizers start their thread pools: one core stays free, and one
# thread keeps the reductions (so the weights) identical run to run.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS", "RAYON_RS_NUM_CPUS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import collections  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import multiprocessing  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a plain checkout, no install needed

from factory.data import synthetic as syn  # noqa: E402
from factory.eval.retrieval import retrieval_accuracy  # noqa: E402

CORPUS = ROOT / "assets" / "corpus"
TRAIN_PLAYS = ("hamlet", "macbeth", "lear", "othello", "romeo_and_juliet", "julius_caesar",
               "merchant_of_venice", "twelfth_night", "midsummer_nights_dream")
HELDOUT_PLAYS = ("tempest",)
EOS, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIALS = (EOS, IM_START, IM_END)  # ids 0..2 in this order
# Qwen2/3 pre-tokenizer split: single digits, so numbers copy digit by digit.
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
              r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
REPORT_DISTANCES = (32, 128, 256, 480, 1024, 2048)
KINDS = syn.KINDS + ("chat", "repeat", "drill")
MIX_NAMES = tuple(k.upper() for k in KINDS)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "assets" / "teacher")
    p.add_argument("--data-out", type=Path, default=ROOT / "assets" / "data")
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--ffn", type=int, default=384)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=8, help="phase 2 rows per step")
    p.add_argument("--short-len", type=int, default=128, help="phase 1 row length")
    p.add_argument("--short-batch", type=int, default=48, help="phase 1 rows per step (0: --batch)")
    p.add_argument("--short-steps", type=int, default=1500, help="phase 1 steps (short rows)")
    p.add_argument("--steps", type=int, default=300, help="phase 2 steps (full-length rows)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--short-mix", type=float, nargs=len(KINDS), default=(0.15, 0.1, 0.15, 0.1, 0.0, 0.15, 0.35),
                   metavar=MIX_NAMES, help="row kind shares in phase 1")
    p.add_argument("--mix", type=float, nargs=len(KINDS), default=(0.05, 0.15, 0.35, 0.0, 0.1, 0.0, 0.35),
                   metavar=MIX_NAMES, help="row kind shares in phase 2")
    p.add_argument("--curriculum", type=float, default=0.3,
                   help="fraction of steps over which the max retrieval distance grows to seq-len")
    p.add_argument("--workers", type=int, default=0,
                   help="processes that build training rows ahead of the GPU (0: in the training process); "
                        "rows are seeded per step, so the count never changes the result")
    p.add_argument("--eval-samples", type=int, default=64)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--probe-heldout", type=int, default=50,
                   help="held-out documents scored at every log step (0: none)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-bf16", dest="bf16", action="store_false",
                   help="train in fp32 instead of bf16 autocast")
    p.add_argument("--skip-data", action="store_true", help="do not (re)write assets/data")
    p.add_argument("--state", type=Path, help="resumable training state: read if present, written at log steps")
    p.add_argument("--max-minutes", type=float, default=0,
                   help="with --state: stop at the first log step past this many minutes of training (0: no limit)")
    args = p.parse_args(argv)
    if args.max_minutes and not args.state:
        p.error("--max-minutes needs --state (where the unfinished build is kept)")
    return args


def read_plays(names) -> str:
    return "\n\n".join((CORPUS / f"{n}.txt").read_text() for n in names)


def build_tokenizer(text: str, vocab_size: int):
    """Byte-level BPE with Qwen's split rule and ChatML specials, as an HF fast tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  min_frequency=2, show_progress=False)
    tok.train_from_iterator(text.split("\n\n"), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS,
                                   additional_special_tokens=[IM_START, IM_END],
                                   model_max_length=4096, clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def model_config(args, tokenizer):
    from transformers import Qwen3Config

    eos = tokenizer.convert_tokens_to_ids(EOS)
    return Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.ffn,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
        head_dim=args.head_dim, max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False, eos_token_id=eos, pad_token_id=eos, bos_token_id=None,
    )


# ---- chat data --------------------------------------------------------------------


def chat_conversation(rng: random.Random, filler: syn.Filler) -> list[dict]:
    """One templated user/assistant exchange: a retrieval question about a short passage."""
    distance, prefix = rng.randint(16, 160), rng.randint(0, 48)
    if rng.random() < 0.5:
        s = syn.passkey_sample(rng, filler, distance, prefix_tokens=prefix)
    else:
        s = syn.kv_sample(rng, filler, distance, n_pairs=rng.randint(2, 4), prefix_tokens=prefix)
    # "What ...? <lead>" becomes the user's question and the assistant's whole sentence.
    ask, _, lead = s.prompt[s.question_start :].partition("? ")
    user = s.prompt[: s.question_start].rstrip() + "\n\n" + ask + "?"
    return [{"role": "user", "content": user},
            {"role": "assistant", "content": lead + s.answer + "."}]


# ---- datasets ---------------------------------------------------------------------


def write_datasets(args, train_filler, heldout_filler) -> dict:
    """The default datasets of the priming pipeline; returns their sizes."""
    out = args.data_out
    out.mkdir(parents=True, exist_ok=True)
    mix = (0.5, 0.2, 0.2, 0.1)
    rng = random.Random(f"{args.seed}/train-docs")
    train = syn.training_documents(rng, train_filler, 1200, args.seq_len, mix)
    rng = random.Random(f"{args.seed}/heldout-docs")
    heldout = syn.training_documents(rng, heldout_filler, 200, args.seq_len, mix)
    rng = random.Random(f"{args.seed}/chat")
    chats = [chat_conversation(rng, train_filler if i % 2 else heldout_filler) for i in range(300)]
    _write_jsonl(out / "train.jsonl", [{"text": t} for t in train])
    _write_jsonl(out / "heldout.jsonl", [{"text": t} for t in heldout])
    _write_jsonl(out / "chat.jsonl", [{"messages": m} for m in chats[:270]])
    _write_jsonl(out / "chat_heldout.jsonl", [{"messages": m} for m in chats[270:]])
    return {"train": len(train), "heldout": len(heldout), "chat": 270, "chat_heldout": 30}


def _write_jsonl(path: Path, rows) -> None:
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---- training rows ----------------------------------------------------------------


class RowSampler:
    """Rows of exactly ``length`` tokens: corpus windows, retrieval documents, chats, key-value
    drills and repeated random segments (which only copying can predict).

    Each step's rows come from their own seeded generators, so a step's batch depends on the seed
    and the step alone: a resumed build needs no sampler state, and rows can be built in other
    processes (``--workers``) without changing them."""

    def __init__(self, args, tokenizer, filler: syn.Filler, corpus_ids: list[int]):
        self.seed = args.seed
        self.tok, self.filler, self.ids = tokenizer, filler, corpus_ids
        self.eos = tokenizer.convert_tokens_to_ids(EOS)

    def batch(self, step: int, n: int, length: int, mix, max_distance: int) -> list[list[int]]:
        kinds = random.Random(f"{self.seed}/rows/{step}").choices(KINDS, weights=mix, k=n)
        return [self.row(random.Random(f"{self.seed}/rows/{step}/{i}"), k, length, max_distance)
                for i, k in enumerate(kinds)]

    def row(self, rng: random.Random, kind: str, length: int, max_distance: int) -> list[int]:
        if kind == "corpus":
            return self.window(rng, length)
        if kind == "repeat":
            seg = rng.choice((16, 32, 64))
            ids = [rng.randrange(len(SPECIALS), len(self.tok)) for _ in range(seg)]
            return (ids * (length // seg + 1))[:length]
        if kind == "chat":
            text = self.tok.apply_chat_template(chat_conversation(rng, self.filler), tokenize=False)
            ids = self.encode(text)[: length - 1] + [self.eos]
            return ids + self.window(rng, length - len(ids))
        if kind == "drill":
            doc = kv_drill(rng, self.filler, length, max_distance)
        else:
            doc = syn.training_document(rng, self.filler, kind, length, max_distance)
        ids = self.encode(doc)[:length]
        return ids + self.window(rng, length - len(ids))

    def window(self, rng: random.Random, n: int) -> list[int]:
        start = rng.randrange(len(self.ids) - n)
        return self.ids[start : start + n]

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]


def kv_drill(rng: random.Random, filler: syn.Filler, length: int, max_distance: int) -> str:
    """Key-value recall as dense as a row allows: several facts (distractors for each other, even
    in a 128-token row), a gap from zero tokens up, then some of the keys asked in a random order,
    each answered in place (few questions leave room for a long gap). Matching a key of several tokens is what the eval's key-value task
    needs and what copying alone does not teach."""
    n = rng.randint(2, max(2, min(8, length // 24)))
    keys: list[str] = []
    while len(keys) < n:
        key = syn.random_key(rng)
        keys += [] if key in keys else [key]
    values = [syn.random_digits(rng, 4) for _ in keys]
    block = "".join(syn.kv_fact(k, v) + "\n" for k, v in zip(keys, values)) + "\n"
    asked = rng.sample(range(n), rng.randint(1, n))
    questions = "".join(syn.kv_question(keys[i]) + " " + values[i] + ".\n" for i in asked)
    room = length - filler.count(block) - filler.count(questions) - 8
    gap = rng.randint(0, max(0, min(max_distance, room)))
    prefix = rng.randint(0, max(0, room - gap))
    text = (filler.take(rng, prefix) if prefix else "") + block + (filler.take(rng, gap) if gap else "")
    return text + questions + "\n" + filler.take(rng, 16)


_STREAM_SAMPLER: RowSampler | None = None  # the forked workers' copy


def _stream_batch(request):
    return _STREAM_SAMPLER.batch(*request)


class BatchStream:
    """The batches of steps ``start`` .. ``total - 1`` in order, built ``--workers`` processes ahead
    of the training step (or in this process with no workers)."""

    def __init__(self, sampler: RowSampler, args, start: int, total: int):
        global _STREAM_SAMPLER
        self.sampler, self.args, self.next, self.total = sampler, args, start, total
        self.pool, self.pending = None, collections.deque()
        if args.workers > 0:
            _STREAM_SAMPLER = sampler
            self.pool = multiprocessing.get_context("fork").Pool(args.workers)
            for _ in range(4 * args.workers):
                self._submit()

    def request(self, step: int):
        args = self.args
        short = step < args.short_steps
        length, mix = (args.short_len, args.short_mix) if short else (args.seq_len, args.mix)
        rows = (args.short_batch or args.batch) if short else args.batch
        return step, rows, length, mix, max_distance_at(step, args)

    def _submit(self) -> None:
        if self.next < self.total:
            self.pending.append(self.pool.apply_async(_stream_batch, (self.request(self.next),)))
            self.next += 1

    def get(self, step: int) -> torch.Tensor:
        """The token rows of ``step``, [rows, length]."""
        if self.pool is None:
            return torch.tensor(self.sampler.batch(*self.request(step)))
        rows = self.pending.popleft().get()
        self._submit()
        return torch.tensor(rows)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()


def lr_at(step: int, args) -> float:
    """Warmup, constant through phase 1, then cosine down to a tenth over phase 2."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    if step < args.short_steps:
        return args.lr
    progress = (step - args.short_steps) / max(1, args.steps - 1)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def max_distance_at(step: int, args) -> int:
    """Phase 1: whatever fits a short row. Phase 2: grows from 64 to seq_len - 32."""
    if step < args.short_steps:
        return args.short_len - 32
    ramp = args.curriculum * args.steps
    frac = 1.0 if ramp <= 0 else min(1.0, (step - args.short_steps) / ramp)
    return int(64 + frac * (args.seq_len - 32 - 64))


def train(model, sampler: RowSampler, tokenizer, heldout: list[str], args) -> list[dict] | None:
    """Phase 1: short rows, heavy in copying (repeats, retrieval at short distances), so
    a deep model finds induction heads within the budget while learning the text. Phase 2:
    full-length rows with retrieval out to the training length.

    With ``--state``, training resumes from that file when it exists and writes it at every log
    step; with ``--max-minutes`` it also stops at the first log step past the limit and returns
    None (the build is unfinished: run the same command again to go on)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
                            fused=torch.device(args.device).type == "cuda")
    start, log = load_state(args.state, model, opt) if args.state else (0, [])
    t0, running = time.time(), 0.0
    model.train()
    total = args.short_steps + args.steps
    stream = BatchStream(sampler, args, start, total)
    try:
        for step in range(start, total):
            running += train_step(model, opt, stream.get(step), lr_at(step, args), args)
            if (step + 1) % args.log_every == 0 or step + 1 == total:
                log.append(progress_entry(model, tokenizer, heldout, args, step, running, t0))
                running = 0.0
                if args.state:
                    save_state(args.state, model, opt, step + 1, log)
                if args.max_minutes and time.time() - t0 > 60 * args.max_minutes and step + 1 < total:
                    print(f"stopped after step {step + 1} of {total} (--max-minutes); state in {args.state}",
                          flush=True)
                    return None
    finally:
        stream.close()
    return log


def save_state(path: Path, model, opt, step: int, log: list[dict]) -> None:
    """Everything a resumed build needs to continue exactly: weights, optimizer, step (which fixes
    the rows to come), RNG."""
    state = {"step": step, "log": log, "model": model.state_dict(), "opt": opt.state_dict(),
             "torch_rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path.with_suffix(".partial"))
    os.replace(path.with_suffix(".partial"), path)


def load_state(path: Path, model, opt) -> tuple[int, list[dict]]:
    if not path.exists():
        return 0, []
    state = torch.load(path, weights_only=False)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    print(f"resumed at step {state['step']} from {path}", flush=True)
    return state["step"], state["log"]


def train_step(model, opt, ids: torch.Tensor, lr: float, args) -> float:
    for group in opt.param_groups:
        group["lr"] = lr
    ids = ids.to(args.device)
    with torch.autocast(device_type=torch.device(args.device).type, dtype=torch.bfloat16,
                        enabled=args.bf16):
        logits = model(input_ids=ids[:, :-1]).logits
    loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.detach()  # read at log steps only: a read every step would stall the GPU queue


def progress_entry(model, tokenizer, heldout, args, step, running, t0) -> dict:
    """Loss since the last entry, held-out loss on a few documents, and a small retrieval probe
    near and far."""
    n = (step % args.log_every) + 1
    near, far = 64, args.seq_len - 32
    acc = retrieval_accuracy(model, tokenizer, [near, far], 16, seed=10_000 + step,
                             device=args.device)
    entry = {"phase": 1 if step < args.short_steps else 2, "step": step + 1, "train_loss": round(float(running) / n, 4),
             "elapsed_s": round(time.time() - t0, 1)}
    if args.probe_heldout:
        entry["heldout_loss"] = round(heldout_loss(model, tokenizer, heldout[: args.probe_heldout], args), 4)
    for task in acc:
        entry.update({f"{task}@{d}": a for d, a in acc[task].items()})
    print(json.dumps(entry), flush=True)
    model.train()
    return entry


@torch.no_grad()
def heldout_loss(model, tokenizer, texts: list[str], args, batch: int = 16) -> float:
    """Mean next-token loss over the held-out documents, each cut to seq_len tokens (right-padded
    batches: under a causal model the padding is never seen, and its targets are ignored)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    docs = [tokenizer(t, add_special_tokens=False)["input_ids"][: args.seq_len] for t in texts]
    for i in range(0, len(docs), batch):
        chunk = docs[i : i + batch]
        x = torch.full((len(chunk), max(map(len, chunk))), -100, dtype=torch.long)
        for row, ids in enumerate(chunk):
            x[row, : len(ids)] = torch.tensor(ids)
        x = x.to(args.device)
        logits = model(input_ids=x[:, :-1].clamp(min=0)).logits.float()
        total += F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item()
        count += int((x[:, 1:] != -100).sum())
    model.train(was_training)
    return total / count


def main(argv=None) -> None:
    args = parse_args(argv)
    from transformers import Qwen3ForCausalLM

    t_start = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train_text, heldout_text = read_plays(TRAIN_PLAYS), read_plays(HELDOUT_PLAYS)
    tokenizer = build_tokenizer(train_text, args.vocab)
    count = syn.token_counter(tokenizer)
    train_filler, heldout_filler = syn.Filler(train_text, count), syn.Filler(heldout_text, count)
    data_sizes = None if args.skip_data else write_datasets(args, train_filler, heldout_filler)

    config = model_config(args, tokenizer)
    model = Qwen3ForCausalLM(config).to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"tokenizer {len(tokenizer)} tokens; model {n_params:,} parameters", flush=True)
    corpus_ids = tokenizer(train_text, add_special_tokens=False, verbose=False)["input_ids"]
    sampler = RowSampler(args, tokenizer, train_filler, corpus_ids)
    heldout = [r["text"] for r in read_jsonl(args.data_out / "heldout.jsonl")]
    t_train = time.time()
    log = train(model, sampler, tokenizer, heldout, args)
    if log is None:
        return
    train_s = time.time() - t_train

    loss = heldout_loss(model, tokenizer, heldout, args)
    acc = retrieval_accuracy(model, tokenizer, REPORT_DISTANCES, args.eval_samples,
                             seed=args.seed, device=args.device)
    save(model, tokenizer, args.out)
    report = {
        "seed": args.seed, "config": config.to_dict(), "parameters": n_params,
        "build_args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "steps": args.steps, "short_steps": args.short_steps,
        "tokens_seen": args.batch * args.steps * args.seq_len
        + (args.short_batch or args.batch) * args.short_steps * args.short_len,
        "train_wall_s": round(train_s, 1), "build_wall_s": round(time.time() - t_start, 1),
        "heldout_loss": round(loss, 4), "heldout_docs": len(heldout),
        "retrieval_accuracy": acc, "retrieval_samples_per_distance": args.eval_samples,
        "training_length": args.seq_len, "datasets": data_sizes, "log": log,
        "torch": torch.__version__, "device": args.device,
    }
    (args.out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("heldout_loss", "retrieval_accuracy",
                                             "build_wall_s")}), flush=True)


def save(model, tokenizer, out: Path) -> None:
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    model = model.to("cpu").float()
    eos = tokenizer.convert_tokens_to_ids(EOS)
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.convert_tokens_to_ids(IM_END), eos], pad_token_id=eos,
        do_sample=False, max_new_tokens=64)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


if __name__ == "__main__":
    main()
