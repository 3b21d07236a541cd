"""A callback that stops training the way a kill does, for resume tests (``--trainer.callbacks``)."""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback


class SimulatedKill(RuntimeError):
    pass


class KillAtEpochEnd(Callback):
    """Raise at the end of 0-based epoch ``epoch``, before that epoch's checkpoint is written
    (Lightning runs checkpoint callbacks last)."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            raise SimulatedKill(f"simulated kill at the end of epoch {self.epoch}")


class KillAtStep(Callback):
    """Raise once optimiser step ``step`` has run, before a resume point of that step is written (the
    trainer's callbacks run before the module's)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise SimulatedKill(f"simulated kill after step {self.step}")


class KillAtPredictBatch(Callback):
    """Raise once predict batch ``batch`` (0-based) has run, as a kill between two batches would."""

    def __init__(self, batch: int):
        self.batch = batch

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == self.batch:
            raise SimulatedKill(f"simulated kill after predict batch {self.batch}")
