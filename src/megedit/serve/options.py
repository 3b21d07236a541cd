"""What a server takes from its command line: one dataclass, so the CLI, the app and the tests share defaults."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServeOptions:
    # Batching: a batch closes when it holds max_batch prompts or batch_window_ms after its first request.
    # 32 is greedy_generate's own batch size, so a full batch is one generate call.
    max_batch: int = 32
    batch_window_ms: float = 10.0
    # Request limits: a request over one of them gets a 400 naming the field, never a slow or failed batch.
    max_prompt_chars: int = 2000
    max_tokens_limit: int = 128  # the largest max_tokens a request may ask for
    default_max_tokens: int = 20  # max_tokens when a request gives none (megedit ask's default)
    max_queued_requests: int = 4096  # beyond this the server answers 503 instead of growing its queue
    # plain: the same LM with no neuron and no router, through the same batcher and endpoints
    # (the baseline of bench/serve.py).
    plain: bool = False

    def __post_init__(self):
        for name in ("max_batch", "max_prompt_chars", "max_tokens_limit", "default_max_tokens", "max_queued_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.batch_window_ms < 0:
            raise ValueError(f"batch_window_ms must be >= 0, got {self.batch_window_ms}")
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(f"default_max_tokens ({self.default_max_tokens}) exceeds max_tokens_limit "
                             f"({self.max_tokens_limit})")
