"""What a stage declares: its name, the config slice it reads, the shared settings it reads, the
stage it builds on, which ranks run it, and its run function. ``factory.stages.registry`` holds the
one list of stages.

A stage's identity (``factory.stages.identity``) is its slice, its shared settings and its parent's
identity, so only what a stage reads decides whether its artifact can be reused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from factory.stages.context import RANKS, StageContext

# Shared settings, as dotted paths into PrimeConfig. ``device`` and ``precision`` are hashed as
# what they resolved to (``auto`` on a CPU box is ``cpu``).
RUN = ("seed", "device", "precision")
MODEL = ("model.path", "model.family", "model.attn_implementation")
# align's and distill's rows: the user's text and the synthetic recall rows mixed into it.
TEXT = ("data.train_files", "data.text_field", "data.seq_len", "data.synthetic_mix")
# ZeRO settings decide how training and sharded loading compute (and round); they are identity.
DEEPSPEED = ("deepspeed",)
# Never identity, in any slice: they change how a run reports, not what it computes.
REPORTING = ("log_every", "plot")


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[StageContext], dict]
    slice: str | None  # PrimeConfig attribute of its own settings (None: it has none)
    shared: tuple[str, ...]  # other settings it reads
    parent: str | None  # the stage whose artifact it needs somewhere before it (its input)
    ranks: str = "main"  # all | zero3 | main: see factory.stages.context.RANKS
    ignored: tuple[str, ...] = REPORTING  # fields of its slice that cannot change its results

    def __post_init__(self):
        if self.ranks not in RANKS:
            raise ValueError(f"stage {self.name}: ranks '{self.ranks}' is not one of {RANKS}")
