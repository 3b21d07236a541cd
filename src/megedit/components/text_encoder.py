"""The query encoder: a BERT-like model pooled to one L2-normalised vector per text.

It is the condition of the generator and the input of the familiarity router, so every
stage embeds text through this one class. A saved encoder is a standard HF folder
(``AutoModel`` loads it) plus ``pooling.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from megedit.artifacts import atomic_path, atomic_write_json

Pooling = Literal["cls", "mean"]
POOLING_FILE = "pooling.json"


class TextEncoder(nn.Module):
    def __init__(self, backbone: nn.Module, tokenizer, pooling: Pooling = "cls", max_length: int = 64):
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
        self.backbone, self.tokenizer, self.pooling, self.max_length = backbone, tokenizer, pooling, max_length

    @property
    def dim(self) -> int:
        return self.backbone.config.hidden_size

    @classmethod
    def from_source(cls, source: str, pooling: Pooling = "cls", max_length: int = 64) -> "TextEncoder":
        """From a registry encoder source (hub id, local folder, ``pkg://``) or a saved encoder folder."""
        from megedit.loading import load_encoder

        folder = Path(source)
        if (folder / POOLING_FILE).is_file():
            meta = json.loads((folder / POOLING_FILE).read_text())
            pooling, max_length = meta["pooling"], meta["max_length"]
        backbone, tokenizer = load_encoder(source)
        return cls(backbone, tokenizer, pooling, max_length)

    def tokenize(self, texts: list[str]) -> dict:
        return self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **extra) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return F.normalize(pooled, dim=-1)

    @torch.no_grad()
    def embed(self, texts: list[str], batch_size: int = 256, device: torch.device | str | None = None,
              progress: bool = False) -> torch.Tensor:
        """Embeddings ``[len(texts), dim]`` (float32, on CPU), in input order."""
        device = device or next(self.parameters()).device
        was_training = self.training
        self.eval()
        out = []
        starts = range(0, len(texts), batch_size)
        if progress:
            from tqdm import tqdm

            starts = tqdm(starts, desc="embedding", unit="batch")
        for i in starts:
            batch = {k: v.to(device) for k, v in self.tokenize(texts[i:i + batch_size]).items()}
            out.append(self(**batch).float().cpu())
        self.train(was_training)
        return torch.cat(out) if out else torch.empty(0, self.dim)

    def save(self, folder: str | Path) -> None:
        """Atomically write an HF folder that ``AutoModel.from_pretrained`` loads, plus the pooling choice."""
        with atomic_path(folder) as tmp:
            self.backbone.save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)
            atomic_write_json(Path(tmp) / POOLING_FILE, {"pooling": self.pooling, "max_length": self.max_length})
