"""Retrieval accuracy by distance (key-value recall, passkey) for any HF causal LM.

Scoring uses teacher forcing: a sample is correct when the argmax at every answer
position equals the answer token, which is exactly what greedy decoding would emit,
at the cost of one forward pass. Batches are right-padded: under a causal model the
real tokens never see the padding, so no attention mask is needed and recurrent
(hybrid) layers give the same outputs as unpadded runs.
"""

from __future__ import annotations

import random
from typing import Iterable, Sequence

import torch

from factory.data.synthetic import DEFAULT_FILLER, Filler, Sample, encode_sample, make_samples, token_counter

__all__ = ["DEFAULT_FILLER", "TASKS", "encode_sample", "retrieval_accuracy", "score_samples"]
TASKS = ("kv", "passkey")


def retrieval_accuracy(model, tokenizer, distances: Iterable[int], samples_per_distance: int,
                       seed: int, tasks: Sequence[str] = TASKS, device: str = "cpu",
                       filler_text: str | None = None, max_batch_tokens: int = 32768) -> dict:
    """Accuracy per task and distance: ``{task: {distance: accuracy}}``.

    ``filler_text`` defaults to the held-out play of the embedded corpus, which the
    teacher never trained on.
    """
    distances = list(distances)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not distances or samples_per_distance < 1:
        raise ValueError(f"bad retrieval eval request: tasks={list(tasks)} (known {list(TASKS)}), "
                         f"distances={distances}, samples_per_distance={samples_per_distance}")
    text = filler_text if filler_text is not None else DEFAULT_FILLER.read_text()
    filler = Filler(text, token_counter(tokenizer))
    result: dict = {}
    for task in tasks:
        result[task] = {}
        for distance in distances:
            # One stream per (task, distance) so adding a distance leaves the others unchanged.
            rng = random.Random(f"{seed}/{task}/{distance}")
            samples = make_samples(task, rng, filler, distance, samples_per_distance)
            hits = score_samples(model, tokenizer, samples, device, max_batch_tokens)
            result[task][distance] = sum(hits) / len(hits)
    return result


@torch.no_grad()
def score_samples(model, tokenizer, samples: Sequence[Sample], device: str = "cpu",
                  max_batch_tokens: int = 32768) -> list[bool]:
    """Per sample: does the greedy continuation of the prompt reproduce the answer? A sample is
    anything with ``prompt`` and ``answer`` strings (users' recall items too, ``factory.eval.recall``)."""
    encoded = [encode_sample(tokenizer, s) for s in samples]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    hits = [False] * len(encoded)
    was_training = model.training
    model.eval()
    for batch in _batches(order, encoded, max_batch_tokens):
        width = max(len(encoded[i][0]) for i in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, : len(encoded[i][0])] = torch.tensor(encoded[i][0])
        pred = model(input_ids=ids.to(device)).logits.argmax(-1).cpu()
        for row, i in enumerate(batch):
            seq, n_ans = encoded[i]
            start = len(seq) - n_ans
            # Logits at position p predict token p + 1.
            got = pred[row, start - 1 : len(seq) - 1]
            hits[i] = bool((got == torch.tensor(seq[start:])).all())
    model.train(was_training)
    return hits


def _batches(order: list[int], encoded, max_batch_tokens: int):
    batch: list[int] = []
    for i in order:
        width = len(encoded[i][0])  # sorted ascending, so this is the batch width
        if batch and (len(batch) + 1) * width > max_batch_tokens:
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch
