"""Run under torchrun with 2 processes: SP=2 must equal SP=1 for a 50% hybrid on packed rows
(logits, loss and every gradient), with GDN both head-parallel and all-gathered. Exits non-zero
on any mismatch."""

from __future__ import annotations

import copy
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from factory.data.packing import IGNORE_INDEX
from factory.distributed.sequence_parallel import GDN_MODES, SequenceParallel, SequenceParallelError
from tests.helpers import tiny_hybrid


def packed_batch(T: int = 24):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 101, (2, T), generator=gen)
    positions = torch.stack([torch.cat([torch.arange(9), torch.arange(T - 9)]),
                             torch.cat([torch.arange(5), torch.arange(11), torch.arange(T - 16)])])
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = IGNORE_INDEX
    labels[torch.roll(positions, -1, dims=1) == 0] = IGNORE_INDEX  # no target across documents
    return {"input_ids": ids, "position_ids": positions, "labels": labels}


def loss_sum(logits, labels):
    valid = labels != IGNORE_INDEX
    return F.cross_entropy(logits[valid].float(), labels[valid], reduction="sum"), int(valid.sum())


def check_equal_to_reference(model, reference, sp: SequenceParallel, batch, logits, loss) -> int:
    """One SP forward/backward of ``model`` against the SP=1 ``logits``, ``loss`` and the gradients
    already in ``reference``; returns how many gradients were compared."""
    model.zero_grad(set_to_none=True)
    local = sp.shard(batch)
    local_logits = model(local["input_ids"], position_ids=local["position_ids"], use_cache=False).logits
    local_sum, local_count = loss_sum(local_logits, local["labels"])
    sp.global_mean(local_sum, local_count).backward()

    gathered = [torch.empty_like(local_logits) for _ in range(sp.degree)]
    dist.all_gather(gathered, local_logits.detach().contiguous())
    torch.testing.assert_close(torch.cat(gathered, dim=1), logits, atol=1e-5, rtol=1e-4)
    whole_sum = local_sum.detach().clone()
    dist.all_reduce(whole_sum)
    torch.testing.assert_close(whole_sum / int((batch["labels"] != IGNORE_INDEX).sum()), loss, atol=1e-6, rtol=1e-5)
    checked = gdn = 0
    for (name, p), (_, p_ref) in zip(model.named_parameters(), reference.named_parameters()):
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(grad, op=dist.ReduceOp.AVG)  # what data-parallel averaging does
        torch.testing.assert_close(grad, p_ref.grad, atol=1e-5, rtol=1e-4,
                                   msg=lambda m: f"{sp.gdn_mode}, {name}: {m}")
        checked += 1
        gdn += ".linear_attn." in name
    assert gdn > 0
    return checked


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    reference = tiny_hybrid(seed=0).train()
    reference.set_attn_implementation("sdpa")
    model = copy.deepcopy(reference)
    batch = packed_batch()

    logits = reference(batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    total, count = loss_sum(logits, batch["labels"])
    (total / count).backward()

    sp = SequenceParallel(dist.group.WORLD, world, rank)
    sp.check(model.config, batch["input_ids"].shape[1])
    sp.apply(model)
    for mode in GDN_MODES:  # one launch for both: starting the processes is the slow part
        sp.gdn_mode = mode
        checked = check_equal_to_reference(model, reference, sp, batch, logits.detach(), (total / count).detach())
        print(f"rank {rank}: SP={world} equals SP=1 with gdn_mode={mode} (logits, loss, {checked} gradients)")
    try:
        sp.check(model.config, 23)
        raise AssertionError("odd row length accepted")
    except SequenceParallelError as err:
        assert "row length 23" in str(err) and "\n" not in str(err)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
