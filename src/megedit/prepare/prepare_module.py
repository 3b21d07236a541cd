"""Runs the frozen base LM once over every edit prompt, paraphrase and locality prompt and
writes the prepare artifact (see ``megedit.prepare.artifact``)."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import torch

from megedit.artifacts import write_manifest
from megedit.distributed import gather_objects
from megedit.loading import load_lm, state_dict_sha256
from megedit.prepare.answer_log import AnswerLog
from megedit.prepare.answers import edit_rows, greedy_answers
from megedit.handover import ReceivesInputs
from megedit.prepare.artifact import write_prepared
from megedit.registry import load_model_spec


class PrepareModule(ReceivesInputs, L.LightningModule):
    def __init__(self, model: str = "smollm2", out_dir: str = "runs/prepare", max_new_tokens: int = 20):
        """
        Args:
            model: registry name; linked from ``data.model`` by the CLI.
            out_dir: where the artifact goes; the next stages read it from here.
            max_new_tokens: length of the recorded greedy answers (the official AG protocol uses 20).
        """
        super().__init__()
        self.save_hyperparameters()
        self.spec = load_model_spec(model)
        self.lm, self.tokenizer = load_lm(self.spec)
        self._answers: dict[int, list[int]] = {}
        self._log: AnswerLog | None = None
        self._started = time.time()

    def on_predict_start(self) -> None:
        # What an answer depends on; a log written under anything else is not reused (megedit.prepare.answer_log).
        self._log = AnswerLog(self.hparams.out_dir, self._answer_header(), self.global_rank)
        if self._log.batches:
            print(f"prepare: resuming with {self._log.n_answers} answers already generated")

    def _answer_header(self) -> dict:
        import transformers

        tok = self.tokenizer
        return {"model_weights_sha256": self._weights_sha256(), "max_new_tokens": self.hparams.max_new_tokens,
                "batch_size": self.inputs.data_config["batch_size"], "precision": str(self.trainer.precision),
                "device": self.device.type, "tokenizer": [tok.name_or_path, len(tok), tok.padding_side],
                "versions": [torch.__version__, transformers.__version__]}

    def _weights_sha256(self) -> str:
        if not hasattr(self, "_sha256"):
            self._sha256 = state_dict_sha256(self.lm)
        return self._sha256

    def predict_step(self, batch: dict, batch_idx: int):
        answers = self._log.answers_for(batch["texts"])  # the same batch, answered before a kill
        if answers is None:
            answers = greedy_answers(self.lm, self.tokenizer, batch["input_ids"], batch["attention_mask"],
                                     self.hparams.max_new_tokens)
            self._log.append(batch["texts"], answers)
        self._answers.update(zip(batch["keys"], answers))

    def on_predict_epoch_end(self) -> None:
        answers = {}
        for part in gather_objects(self._answers):
            answers.update(part)
        if self.global_rank == 0:
            self._write(answers)

    def _write(self, answers: dict[int, list[int]]) -> None:
        data = self.inputs
        hp, splits = data.data_config, data.splits
        rows = edit_rows(splits.edits, data.requests, answers, self.tokenizer)
        n_candidates = len(rows)
        if hp["only_wrong"]:
            rows = [r for r in rows if not r["base_correct"]]
            if len(rows) < hp["n_edits"]:
                raise RuntimeError(f"only_wrong: {len(rows)} of {n_candidates} candidates are wrong for the base "
                                   f"model, fewer than N={hp['n_edits']}; raise data.oversample or lower N")
            rows = rows[: hp["n_edits"]]
        base_correct = sum(r["base_correct"] for r in rows)

        out = Path(self.hparams.out_dir)
        report = {"drops": data.drops, "split_counts": splits.counts,
                  "edits": len(rows), "candidates_answered": n_candidates,
                  "base_model_already_correct": base_correct, "prompts_answered": len(data.requests),
                  "wall_seconds": round(time.time() - self._started, 1)}
        outputs = write_prepared(out, rows, splits, report)
        lineage = {"model": self.spec.name, "model_source": self.spec.source,
                   "model_weights_sha256": self._weights_sha256(), "edit_layer": self.spec.edit_layer,
                   "dataset": data.dataset, "n_edits": hp["n_edits"], "seed": hp["seed"], "only_wrong": hp["only_wrong"]}
        write_manifest(out, "prepare", lineage, config={"data": hp, "model": dict(self.hparams)},
                       outputs=outputs, input_files=data.input_files,
                       extra={"model_spec": self.spec.to_dict()})
        self._log.remove()  # the artifact holds every answer now
        print(f"prepare: wrote {len(rows)} edits, {len(splits.pseudo_edits)} pseudo edits, "
              f"{len(splits.pseudo_pairs)} pseudo pairs, {len(splits.pseudo_irrelevant)} pseudo-irrelevant prompts "
              f"to {out} ({report['wall_seconds']} s)")

    def configure_optimizers(self):
        return None
