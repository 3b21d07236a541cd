"""Serves every evaluation item of a run: each edit's prompt (Reliability), its paraphrases
(Generality) and its locality prompts (Locality, judged against the pre-edit answers)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader

from megedit.edits.versions import resolve_version
from megedit.evaluate.items import edit_items
from megedit.prepare.artifact import load_prepared


@dataclass
class EvaluationInputs:
    """What the evaluate module receives from its datamodule (``megedit.handover``); batches are the items."""
    run_dir: Path  # the run folder scored (a version's folder when the run has versions)
    version: int | None  # which version of the run that is
    items: list[dict]  # every evaluation item, in batch order
    data_config: dict  # the datamodule's arguments, for the manifest

    @property
    def edit_indices(self) -> list[int]:
        """The edits this evaluation serves (all, or the first ``limit``): what the peers edit."""
        return sorted({it["edit"] for it in self.items})


class EvaluateDataModule(L.LightningDataModule):
    def __init__(self, run_dir: str = "runs/smollm2-counterfact-1024", batch_size: int = 32, limit: int | None = None,
                 version: int | None = None):
        """
        Args:
            run_dir: the run whose artifacts are evaluated; its ``prepare/`` holds the items (edits,
                paraphrases, locality prompts, pre-edit answers), so a run is always scored on its own edits.
                A run with versions (``megedit edits``) is scored at its latest version, as it is served;
                a version folder (``RUN/versions/<n>``) as itself.
            batch_size: evaluation items per step.
            limit: evaluate only the first ``limit`` edits (quick looks; recorded in the results).
            version: score this version of the run instead (0: the run as the pipeline made it).
        """
        super().__init__()
        self.save_hyperparameters()
        self.items: list[dict] | None = None  # setup() reads the run once

    def setup(self, stage: str | None = None) -> None:
        if self.items is None:
            self._read_run()

    def _read_run(self) -> None:
        self.run_dir, self.version = resolve_version(self.hparams.run_dir, self.hparams.version)
        self.prepared = load_prepared(self.run_dir / "prepare")
        n = len(self.prepared.edits)
        items = edit_items(self.prepared, range(min(n, self.hparams.limit) if self.hparams.limit else n))
        for k, item in enumerate(items):
            item["key"] = k
        self.items = items

    def handover(self) -> EvaluationInputs:
        return EvaluationInputs(self.run_dir, self.version, self.items, dict(self.hparams))

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.items, batch_size=self.hparams.batch_size, shuffle=False, collate_fn=list)
