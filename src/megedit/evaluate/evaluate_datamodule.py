"""Serves every evaluation item of a run: each edit's prompt (Reliability), its paraphrases
(Generality) and its locality prompts (Locality, judged against the pre-edit answers)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader

from megedit.data.locality_kinds import locality_kind
from megedit.prepare.artifact import load_prepared


class EvaluateDataModule(L.LightningDataModule):
    def __init__(self, run_dir: str = "runs/smollm2-counterfact-1024", batch_size: int = 32, limit: int | None = None):
        """
        Args:
            run_dir: the run whose artifacts are evaluated; its ``prepare/`` holds the items (edits,
                paraphrases, locality prompts, pre-edit answers), so a run is always scored on its own edits.
            batch_size: evaluation items per step.
            limit: evaluate only the first ``limit`` edits (quick looks; recorded in the results).
        """
        super().__init__()
        self.save_hyperparameters()
        self.prepared = None

    def setup(self, stage: str | None = None) -> None:
        if self.prepared is not None:
            return
        self.prepared = load_prepared(Path(self.hparams.run_dir) / "prepare")
        edits = self.prepared.edits[: self.hparams.limit] if self.hparams.limit else self.prepared.edits
        items = []
        for i, (rec, pre) in enumerate(zip(edits, self.prepared.pre_edit)):
            items.append({"edit": i, "group": "reliability", "pos": 0, "query": rec.prompt, "kind": rec.prompt_kind,
                          "target": rec.target_new})
            items += [{"edit": i, "group": "generality", "pos": j, "query": p, "kind": rec.prompt_kind,
                       "target": rec.target_new} for j, p in enumerate(rec.paraphrases)]
            items += [{"edit": i, "group": "locality", "pos": j, "query": loc.prompt, "kind": loc.kind,
                       "target": loc.answer or rec.target_new, "pre_tokens": pre["locality"][j]["tokens"],
                       "locality_kind": locality_kind(rec, loc)}
                      for j, loc in enumerate(rec.locality)]
        for k, item in enumerate(items):
            item["key"] = k
        self.items = items

    def edit_indices(self) -> list[int]:
        """The edits this evaluation serves (all, or the first ``limit``): what the peers edit."""
        self.setup("test")
        return sorted({it["edit"] for it in self.items})

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.items, batch_size=self.hparams.batch_size, shuffle=False, collate_fn=list)
