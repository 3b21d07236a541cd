"""Reads a dataset preset, applies the duplicate policy, makes the seeded split and serves the
prompts whose pre-edit greedy answers the prepare module records."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader

from megedit.data.datasets import load_dataset_config, read_dataset
from megedit.data.readers import DataFormatError
from megedit.data.splits import DropReport, dedupe, make_splits
from megedit.loading import load_tokenizer
from megedit.paths import data_dir as resolve_data_dir
from megedit.prepare.answers import answer_requests, collate_requests
from megedit.registry import load_model_spec


@dataclass
class PrepareInputs:
    """What the prepare module receives from its datamodule (``megedit.handover``); batches are the prompts."""
    splits: object  # ``megedit.data.splits.Splits``: the candidate edits, pseudo edits, pairs, irrelevant prompts
    requests: list[dict]  # every prompt whose pre-edit answer is recorded (``answer_requests``)
    drops: dict  # the duplicate policy's drop counts per file, for the report
    dataset: str  # the dataset preset's name, for the lineage
    input_files: dict  # the benchmark files read, for the manifest
    data_config: dict  # the datamodule's arguments, for the manifest


def check_targets(records, tokenizer, model_name: str) -> None:
    """Refuse a ``target_new`` that tokenises to nothing but the leading space and special tokens: there
    would be nothing to edit toward (the readers accept it: it is a non-empty string)."""
    special = set(tokenizer.all_special_ids)
    for rec in records:
        for j, atom in enumerate(rec.all_atoms()):
            ids = tokenizer(" " + atom.target_new, add_special_tokens=False)["input_ids"]
            content = [i for i in ids if i not in special]
            if not tokenizer.decode(content).strip():
                field = "target_new" if j == 0 else f"atoms[{j - 1}].target_new"
                raise DataFormatError(rec.source, f"target {atom.target_new!r} tokenises to nothing (no text tokens) "
                                      f"with the {model_name} tokenizer", rec.index, rec.id, field)


class PrepareDataModule(L.LightningDataModule):
    def __init__(self, model: str = "smollm2", dataset: str = "counterfact", n_edits: int = 1024, seed: int = 0,
                 data_dir: str | None = None, n_pseudo_irrelevant: int = 2048, max_pseudo_edits: int | None = 8192,
                 only_wrong: bool = False, oversample: float = 2.0, batch_size: int = 32, num_workers: int = 0):
        """
        Args:
            model: registry name (``configs/models/<name>.yaml``) or a YAML path.
            dataset: preset name (``configs/datasets/<name>.yaml``) or a YAML path.
            n_edits: N, the number of edits.
            seed: seed of the split.
            data_dir: benchmark files; default ``$MEGEDIT_DATA_DIR`` then ``../shared/data``.
            n_pseudo_irrelevant: prompts kept aside for threshold calibration and zero-weight augmentation.
            max_pseudo_edits: cap on pseudo-edit records (encoder pairs, transfer diagnostics); None keeps all.
            only_wrong: keep only edits whose ``target_new`` the base model does not already produce
                (the paper's error-correction setting for ZsRE).
            oversample: with ``only_wrong``, how many candidates per wanted edit to answer.
            batch_size: prompts per generation batch.
        """
        super().__init__()
        self.save_hyperparameters()
        self.splits = None

    def setup(self, stage: str | None = None) -> None:
        if self.splits is not None:
            return
        hp = self.hparams
        self.spec = load_model_spec(hp.model)
        self.tokenizer = load_tokenizer(self.spec)
        self.dataset_cfg = load_dataset_config(hp.dataset)
        self.data_root = resolve_data_dir(hp.data_dir)
        invalid: dict = {}
        records, groups, self.input_files = read_dataset(self.dataset_cfg, self.data_root, invalid)
        self.report = DropReport()
        for file, items in invalid.items():  # malformed records the preset chose to drop, each with its error
            for index, message in items:
                self.report.read[file] += 1
                self.report.drop(file, "invalid_record", message)
        unique = dedupe(records, self.report, self.dataset_cfg.dedupe)
        n_candidates = math.ceil(hp.n_edits * hp.oversample) if hp.only_wrong else hp.n_edits
        n_candidates = min(n_candidates, sum(1 for r in unique if r.paraphrases and r.locality)) \
            if hp.only_wrong else n_candidates
        self.splits = make_splits(unique, groups, n_candidates, hp.seed, hp.n_pseudo_irrelevant, hp.max_pseudo_edits)
        check_targets(self.splits.edits, self.tokenizer, self.spec.name)
        self.requests = answer_requests(self.splits.edits, self.spec.format_prompt)

    def handover(self) -> PrepareInputs:
        return PrepareInputs(self.splits, self.requests, self.report.to_dict(), self.dataset_cfg.name,
                             self.input_files, dict(self.hparams))

    def predict_dataloader(self) -> DataLoader:
        # Sorting by length keeps padding (and wasted compute) small; keys restore the order.
        order = sorted(self.requests, key=lambda r: len(r["text"]))
        return DataLoader(order, batch_size=self.hparams.batch_size, shuffle=False,
                          collate_fn=partial(collate_requests, self.tokenizer), num_workers=self.hparams.num_workers)

    @property
    def out_name(self) -> str:
        return f"{Path(self.hparams.model).stem}-{Path(self.hparams.dataset).stem}-{self.hparams.n_edits}"
