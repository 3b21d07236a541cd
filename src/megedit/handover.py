"""How a stage's LightningModule gets what its datamodule prepared, without reaching into the datamodule.

A datamodule that prepares more than batches (embeddings, the upstream artifacts, counts for the report)
implements ``handover() -> <a small dataclass>``: exactly what its module may use, documented on that
dataclass. The module lists ``HandOver()`` among its callbacks (``configure_callbacks``) and implements
``receive(inputs)``. Lightning calls the datamodule's ``setup`` first, then the callbacks' ``setup``, then
the module's ``setup`` (``lightning.pytorch.trainer.call._call_setup_hook``), so a module builds its nets in
``setup`` from inputs it has already received, on every rank, with no ``datamodule.setup()`` of its own.

A module that will not use everything its datamodule can serve says so in ``data_request() -> dict``
(the encoder under an objective without hard negatives); ``HandOver`` passes it to ``datamodule.request(**it)``
before the handover, so the datamodule builds no loader for what nobody trains on and hands over what it
really serves. Data drawn anew each epoch follows ``DataEpoch``, which calls ``datamodule.set_epoch``.

A handover may do the stage's heavy preparation (the familiarity datamodule embeds its texts there, once it
knows what the module will use), so under DDP it runs on every rank, as the callback does. A test or tool
that drives a module without a Trainer calls ``datamodule.setup()``, ``datamodule.request(**module.data_request())``
where the module has one, and ``module.receive(datamodule.handover())`` itself.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback


class HandOver(Callback):
    """Passes ``trainer.datamodule.handover()`` to ``module.receive`` once the datamodule is set up (after
    passing the module's ``data_request()``, where it has one, to ``datamodule.request``)."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        request = getattr(pl_module, "data_request", None)
        if request is not None:
            trainer.datamodule.request(**request())
        pl_module.receive(trainer.datamodule.handover())


class DataEpoch(Callback):
    """Tells the datamodule which training epoch starts (``datamodule.set_epoch(epoch)``), for data drawn anew
    per epoch in the datasets themselves. Lightning's own ``set_epoch`` reaches only the samplers, and under
    DDP it replaces them with its own. Called where the module's ``on_train_epoch_start`` is (before it): a
    run resumed in the middle of an epoch gets no call, and its datamodule sets the epoch when it builds the
    loaders from the checkpoint."""

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        trainer.datamodule.set_epoch(trainer.current_epoch)


class ReceivesInputs:
    """For a LightningModule that only keeps what it is handed (``self.inputs``) and needs no other callback;
    one that checks its inputs or has callbacks of its own implements ``receive`` and ``configure_callbacks``."""

    inputs = None

    def receive(self, inputs) -> None:
        self.inputs = inputs

    def configure_callbacks(self):
        return [HandOver()]
