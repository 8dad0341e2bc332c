"""Which process of a distributed fine-tune this is, from the variables torchrun (and Azure ML's
PyTorch distribution) set: RANK, LOCAL_RANK, WORLD_SIZE.

In a data-parallel run every process runs the same ``ftl finetune``, and the HF Trainer inside Olive
does the DDP (NCCL on GPUs, gloo on CPUs). ftl's part is who writes what:

- rank 0 owns the output folder: the prepared data, the manifest, the adapter;
- every other rank works in a private scratch folder (its Olive cache, its own copy of the data)
  and writes nothing into the output folder, except what the Trainer writes into the shared
  checkpoint folder (each rank's RNG state beside rank 0's checkpoint);
- all ranks resume from the same checkpoint, which each of them works out alike from the shared
  checkpoint folder (:func:`ftl.finetune.stage.last_complete_checkpoint`), so they never disagree
  on the step they start from.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Rank:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def current(environ: dict[str, str] | None = None) -> Rank:
    env = os.environ if environ is None else environ

    def number(name: str, default: int) -> int:
        value = env.get(name, "")
        try:
            return int(value) if value.strip() else default
        except ValueError:
            from ftl.errors import ConfigError

            raise ConfigError(f"${name} is {value!r}, not a number", name,
                              "launch with torchrun (or Azure ML's PyTorch distribution), which sets it") from None

    world = number("WORLD_SIZE", 1)
    return Rank(number("RANK", 0) if world > 1 else 0, number("LOCAL_RANK", 0) if world > 1 else 0, world)
