"""Serves the general-ability items: a fixed seeded subset of each benchmark (all items on request), in
batches that never mix benchmarks (each benchmark is scored its own way)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader

from megedit.general.bbh import PROMPTINGS
from megedit.general.benchmarks import BENCHMARKS, benchmark_files, check_names, load_benchmark
from megedit.general.items import Item, seeded_subset
from megedit.graph import upstream_dirs
from megedit.paths import data_dir as resolve_data_dir


def _as_is(batch):
    return batch


@dataclass
class GeneralInputs:
    """What the general module receives from its datamodule (``megedit.handover``); batches are the items."""
    run_dir: Path  # the edited run scored
    benchmarks: list[str]  # in the order they are reported
    items: dict[str, list[Item]]  # each benchmark's scored items (a seeded subset, in file order)
    totals: dict[str, int]  # each benchmark's item count before the subset
    bbh_prompting: str  # answer_only or cot: part of a BBH row's fingerprint
    lm_batch_size: int  # prompts per LM batch
    subset: dict  # {items_per_benchmark, seed}: how the items were drawn, for the report
    input_files: dict  # {name: path} of the benchmark files read, for the manifest
    data_config: dict  # the datamodule's arguments, for the manifest
    upstream: dict  # {input stage: folder}, for the manifest


class GeneralDataModule(L.LightningDataModule):
    def __init__(self, run_dir: str = "runs/smollm2-counterfact-1024", benchmarks: list[str] = list(BENCHMARKS),
                 items_per_benchmark: int | None = 200, seed: int = 0, bbh_prompting: str = "answer_only",
                 data_dir: str | None = None, batch_size: int = 8):
        """
        Args:
            run_dir: the edited run (its ``prepare/ encoder/ familiarity/ diffusion/``; peers also read
                ``evaluate/``).
            benchmarks: any of bbh, gsm8k, mmlu, rte, sst2.
            items_per_benchmark: a seeded uniform subset of this many items per benchmark, the same for every
                variant and rerun; None scores every item (the ``--all`` setting).
            seed: seed of the subsets.
            bbh_prompting: ``answer_only`` (3-shot, answer on the first line; cheap) or ``cot`` (3-shot chain
                of thought, the MeG paper's setting; give ``--model.bbh_max_new_tokens`` a few hundred).
            data_dir: benchmark files; default ``$MEGEDIT_DATA_DIR`` then ``../shared/data``.
            batch_size: prompts per LM batch.
        """
        super().__init__()
        self.save_hyperparameters()
        check_names(benchmarks)
        if bbh_prompting not in PROMPTINGS:
            raise ValueError(f"bbh_prompting must be one of {PROMPTINGS}, got {bbh_prompting!r}")
        if items_per_benchmark is not None and items_per_benchmark < 1:
            raise ValueError(f"items_per_benchmark must be >= 1 or null (all items), got {items_per_benchmark}")
        self.items: dict[str, list[Item]] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.items is not None:
            return
        hp = self.hparams
        self.data_root = resolve_data_dir(hp.data_dir)
        self.items, self.totals, self.input_files = {}, {}, {}
        for name in hp.benchmarks:
            every = load_benchmark(name, self.data_root, hp.bbh_prompting)
            self.totals[name] = len(every)
            self.items[name] = seeded_subset(every, hp.items_per_benchmark, hp.seed)
            self.input_files |= benchmark_files(name, self.data_root)

    def handover(self) -> GeneralInputs:
        hp = self.hparams
        return GeneralInputs(Path(hp.run_dir), list(hp.benchmarks), self.items, self.totals, hp.bbh_prompting,
                             hp.batch_size, {"items_per_benchmark": hp.items_per_benchmark, "seed": hp.seed},
                             self.input_files, dict(hp), upstream_dirs("general", hp))

    def batches(self) -> list[list[Item]]:
        """Each benchmark's items in batches of similar prompt length (less padding)."""
        self.setup()
        out = []
        for items in self.items.values():
            ordered = sorted(items, key=lambda it: len(it.prompt()))
            out += [ordered[i:i + self.hparams.batch_size] for i in range(0, len(ordered), self.hparams.batch_size)]
        return out

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch  # items are text (frozen dataclasses, which Lightning's collection walk refuses); no tensors

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.batches(), batch_size=None, shuffle=False, collate_fn=_as_is)
