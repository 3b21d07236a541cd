"""FT baseline (as in the paper): fine-tune the MLP of the edit layer on all edits at once.

Only that MLP's parameters train (teacher-forced NLL of the target tokens); everything else is
frozen. Like the paper's FT it trains until it has learnt the edits: after each epoch it measures the
edits' reliability (every target token the argmax under teacher forcing, which is what greedy decoding of
the target's length returns) and stops once that reaches ``target_reliability``, or at the epoch budget. The tuned MLP is returned as a state dict and the LM is restored, so MeG and FT are
evaluated on the same loaded model by swapping the MLP in and out (``swapped_mlp``).
"""

from __future__ import annotations

import contextlib
import random
from typing import Sequence

import torch
from tqdm import tqdm

from megedit.loading import edit_mlp
from megedit.registry import ModelSpec
from megedit.scoring import target_batch, teacher_forced


def finetune_mlp(lm, tokenizer, spec: ModelSpec, prompts: Sequence[str], targets: Sequence[str], epochs: int = 30,
                 lr: float = 2e-3, batch_size: int = 32, seed: int = 0, target_reliability: float | None = 0.95,
                 progress: bool = True) -> dict:
    """Returns ``{"state": tuned MLP state dict, "losses": per-epoch mean loss, "reliability": per-epoch exact
    match on the edits (when a target is set), "epochs": epochs run, "reached": whether the target was met}``;
    the LM is left unchanged. ``epochs`` is the budget; ``target_reliability=None`` always runs all of it."""
    mlp = edit_mlp(lm, spec)
    original = {k: v.detach().clone() for k, v in mlp.state_dict().items()}
    params = list(mlp.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    order = list(range(len(prompts)))
    rng = random.Random(seed)
    device = params[0].device
    losses, reliability = [], []
    try:
        bar = tqdm(range(epochs), desc="FT baseline", unit="epoch", disable=not progress)
        for _ in bar:
            rng.shuffle(order)
            total, count = 0.0, 0
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                b = target_batch(tokenizer, [prompts[i] for i in idx], [targets[i] for i in idx])
                logits = lm(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device),
                            position_ids=b["position_ids"].to(device), use_cache=False).logits
                loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                                         b["labels"][:, 1:].flatten().to(device), ignore_index=-100)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
                count += len(idx)
            losses.append(total / max(count, 1))
            if target_reliability is not None:
                with torch.no_grad():
                    exact = teacher_forced(lm, tokenizer, None, prompts, targets, batch_size=batch_size)["exact"]
                reliability.append(round(float(exact.float().mean()), 4))
            bar.set_postfix(loss=f"{losses[-1]:.4f}", **({"rel": reliability[-1]} if reliability else {}))
            if reliability and reliability[-1] >= target_reliability:
                break
        tuned = {k: v.detach().clone() for k, v in mlp.state_dict().items()}
    finally:
        for p in params:
            p.requires_grad_(False)
        mlp.load_state_dict(original)
    reached = bool(reliability) and reliability[-1] >= target_reliability
    return {"state": tuned, "losses": losses, "reliability": reliability, "epochs": len(losses), "reached": reached}


@contextlib.contextmanager
def swapped_mlp(lm, spec: ModelSpec, state: dict):
    """Temporarily load ``state`` into the edit layer's MLP."""
    mlp = edit_mlp(lm, spec)
    original = {k: v.detach().clone() for k, v in mlp.state_dict().items()}
    mlp.load_state_dict(state)
    try:
        yield
    finally:
        mlp.load_state_dict(original)


def named_mlp_weights(lm, spec: ModelSpec, state: dict) -> dict:
    """The tuned MLP state as the LM's parameter names (what ``memit.swapped_weights`` loads)."""
    mlp = edit_mlp(lm, spec)
    prefix = next(name for name, module in lm.named_modules() if module is mlp)
    params = dict(mlp.named_parameters())
    return {f"{prefix}.{k}": v for k, v in state.items() if k in params}
