"""Defaults shared by several entry points, in a module light enough for a ``--help`` to import.

``DEFAULT_STEPS``: DDIM steps of the weight generator where nobody says otherwise (``EditedLM``, ``megedit
ask``, ``megedit serve``, the evaluate and general stages). 10, 50, 100 and 1000 give the same answers on every
scored item of CounterFact-1024's first 256 edits (docs/ablations.md), and 50 costs 5x the sampling time.
"""

DEFAULT_STEPS = 10
