"""Greedy answers to held-out chat prompts: agreement with the teacher and with the reference."""

from __future__ import annotations

import torch


def _prompt_and_reference(messages: list[dict]) -> tuple[list[dict], str] | None:
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    return (messages[:last], messages[last]["content"]) if last else None


@torch.no_grad()
def _greedy(model, tokenizer, prompt: list[dict], max_new_tokens: int, device, synced: bool) -> str:
    ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"].to(device)
    # synced: partitioned (ZeRO-3) models run every rank's forward together until all have finished.
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, synced_gpus=synced,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                         eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>") or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def chat_agreement(teacher, student, tokenizer, conversations: list[list[dict]], max_prompts: int,
                   max_new_tokens: int, device, synced: bool = False) -> dict:
    pairs = [p for p in map(_prompt_and_reference, conversations) if p][:max_prompts]
    same_as_teacher = same_as_reference = 0
    examples = []
    for prompt, reference in pairs:
        t = _greedy(teacher, tokenizer, prompt, max_new_tokens, device, synced)
        s = _greedy(student, tokenizer, prompt, max_new_tokens, device, synced)
        same_as_teacher += t == s
        same_as_reference += s == reference.strip()
        if len(examples) < 3:
            examples.append({"prompt": prompt[-1]["content"], "reference": reference, "teacher": t, "hybrid": s})
    n = max(1, len(pairs))
    return {"prompts": len(pairs), "matches_teacher": same_as_teacher / n, "matches_reference": same_as_reference / n,
            "examples": examples}
