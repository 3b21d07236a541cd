"""Serves the edits of a prepare artifact as fixed shards (the unit of resumption and of DDP work)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader

from megedit.graph import upstream_dirs
from megedit.prepare.artifact import Prepared, load_prepared


@dataclass
class CollectInputs:
    """What the collect module receives from its datamodule (``megedit.handover``); batches are shards."""
    prepared: Prepared  # the prepare artifact: the edits, their pseudo edits, the model spec and lineage
    n_edits: int  # how many edits get a neuron (the first n_edits; ``limit``)
    shards: list[dict]  # every shard {shard, start, end}: what the merge puts together
    data_config: dict  # the datamodule's arguments, for the manifest and the shards' fingerprint
    upstream: dict  # {input stage: folder}, for the manifest


class CollectDataModule(L.LightningDataModule):
    def __init__(self, prepare_dir: str = "runs/smollm2-counterfact-1024/prepare", shard_size: int = 64,
                 limit: int | None = None):
        """
        Args:
            prepare_dir: the prepare artifact whose edits get one neuron each.
            shard_size: edits per shard. A shard is written atomically as soon as all its edits are done;
                a restarted run skips finished shards; under DDP rank r takes shards r, r+W, r+2W, ...
            limit: collect only the first ``limit`` edits (smoke tests); the artifact then has that many rows.
        """
        super().__init__()
        self.save_hyperparameters()
        if shard_size < 1:
            raise ValueError(f"data.shard_size must be >= 1, got {shard_size}")
        self.prepared = None

    def setup(self, stage: str | None = None) -> None:
        if self.prepared is None:
            if not Path(self.hparams.prepare_dir).is_dir():
                raise FileNotFoundError(f"data.prepare_dir {self.hparams.prepare_dir} does not exist; run the "
                                        "prepare stage first (make prepare)")
            self.prepared = load_prepared(self.hparams.prepare_dir)
            if not self.prepared.edits:
                raise ValueError(f"{self.hparams.prepare_dir}: the prepare artifact holds no edits")

    @property
    def n_edits(self) -> int:
        n = len(self.prepared.edits)
        return min(n, self.hparams.limit) if self.hparams.limit else n

    @property
    def shards(self) -> list[dict]:
        size = self.hparams.shard_size
        return [{"shard": k, "start": s, "end": min(s + size, self.n_edits)}
                for k, s in enumerate(range(0, self.n_edits, size))]

    def handover(self) -> CollectInputs:
        return CollectInputs(self.prepared, self.n_edits, self.shards, dict(self.hparams),
                             upstream_dirs("collect", self.hparams))

    def predict_dataloader(self) -> DataLoader:
        items = list(self.shards)
        world = self.trainer.world_size if self.trainer is not None else 1
        # Every rank needs at least one item, or Lightning skips its epoch hooks (where the merge happens).
        while len(items) % world:
            items.append({"shard": -1, "start": 0, "end": 0})
        return DataLoader(items, batch_size=None, shuffle=False, num_workers=0)
