"""Changing a run's set of edits without a full retrain: ``megedit edits add | remove | list``.

A run folder is version 0; each change writes a new, complete version under ``RUN/versions/<n>/``
(``megedit.edits.versions``), so the version being served never changes under a reader. Removal only masks
(``megedit.edits.removed``); addition prepares and collects the new edits and fine-tunes the router and the
generator (``megedit.edits.add``). docs/incremental.md describes the rules.
"""
