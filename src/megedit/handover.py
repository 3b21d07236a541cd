"""How a stage's LightningModule gets what its datamodule prepared, without reaching into the datamodule.

A datamodule that prepares more than batches (embeddings, the upstream artifacts, counts for the report)
implements ``handover() -> <a small dataclass>``: exactly what its module may use, documented on that
dataclass. The module lists ``HandOver()`` among its callbacks (``configure_callbacks``) and implements
``receive(inputs)``. Lightning calls the datamodule's ``setup`` first, then the callbacks' ``setup``, then
the module's ``setup`` (``lightning.pytorch.trainer.call._call_setup_hook``), so a module builds its nets in
``setup`` from inputs it has already received, on every rank, with no ``datamodule.setup()`` of its own.

A test or tool that drives a module without a Trainer calls ``module.receive(datamodule.handover())`` itself.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback


class HandOver(Callback):
    """Passes ``trainer.datamodule.handover()`` to ``module.receive`` once the datamodule is set up."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        pl_module.receive(trainer.datamodule.handover())


class ReceivesInputs:
    """For a LightningModule that only keeps what it is handed (``self.inputs``) and needs no other callback;
    one that checks its inputs or has callbacks of its own implements ``receive`` and ``configure_callbacks``."""

    inputs = None

    def receive(self, inputs) -> None:
        self.inputs = inputs

    def configure_callbacks(self):
        return [HandOver()]
