"""Encoder stage units: the InfoNCE loss against a hand computation, retrieval metrics, pair grouping/splitting."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megedit.components.contrastive import info_nce, mse_alignment, retrieval_metrics
from megedit.encoder.encoder_datamodule import GroupPairs, group_pairs, split_groups


def test_info_nce_matches_hand_computation():
    # Paraphrases p1=(1,0), p2=(0,1); originals o1=(1,0), o2=(0.6,0.8); tau=0.5.
    # Row 1 logits: cos/tau = [2.0, 1.2], target 0 -> log(1 + e^-0.8)
    # Row 2 logits: [0.0, 1.6], target 1        -> log(1 + e^-1.6)
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    o = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    expected = (math.log(1 + math.exp(-0.8)) + math.log(1 + math.exp(-1.6))) / 2
    assert expected == pytest.approx(0.277501, abs=1e-6)
    assert info_nce(p, o, temperature=0.5).item() == pytest.approx(expected, abs=1e-6)


def test_info_nce_is_asymmetric_as_eq5_and_uses_other_originals_as_negatives():
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    o = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    # Swapping which side is the query changes the loss: eq. 5 normalises over originals only.
    assert info_nce(o, p, 0.5).item() != pytest.approx(info_nce(p, o, 0.5).item(), abs=1e-4)
    # A perfectly separated batch at low temperature has ~0 loss; a collapsed one has log(B).
    eye = torch.eye(3)
    assert info_nce(eye, eye, 0.01).item() < 1e-6
    same = F.normalize(torch.ones(3, 3), dim=-1)
    assert info_nce(same, same, 0.1).item() == pytest.approx(math.log(3), abs=1e-5)


def test_info_nce_target_offset_equals_local_loss_on_gathered_originals():
    torch.manual_seed(0)
    p = F.normalize(torch.randn(4, 8), dim=-1)
    o_all = F.normalize(torch.randn(8, 8), dim=-1)
    # rank 1 of 2: its own originals sit at rows 4..7 of the gathered batch
    got = info_nce(p, o_all, 0.1, target_offset=4)
    logits = p @ o_all.T / 0.1
    want = -(logits.log_softmax(-1)[torch.arange(4), torch.arange(4) + 4]).mean()
    assert got.item() == pytest.approx(want.item(), abs=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        info_nce(p, o_all, 0.0)


def test_mse_alignment():
    p = torch.tensor([[1.0, 0.0]])
    o = torch.tensor([[0.0, 1.0]])
    assert mse_alignment(p, o).item() == pytest.approx(2.0)
    assert mse_alignment(o, o).item() == 0.0


def test_retrieval_metrics_hand_example_and_ties():
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7071, 0.7071]])
    queries = torch.tensor([[0.9, 0.1], [0.9, 0.1]])  # first wants key 0 (rank 1), second key 1 (rank 3)
    m = retrieval_metrics(queries, keys, torch.tensor([0, 1]))
    assert m["recall@1"] == 0.5 and m["mrr"] == pytest.approx((1 + 1 / 3) / 2)
    # A collapsed encoder (all embeddings equal) must not look perfect.
    same = torch.ones(3, 2) / math.sqrt(2)
    m = retrieval_metrics(same, same, torch.arange(3))
    assert m["recall@1"] == 0.0


def _pairs():
    rows = []
    for s, n in (("cf", 40), ("corpus", 300)):
        for g in range(n):
            rows += [{"anchor": f"{s} original {g}", "positive": f"{s} para {g}.{j}", "group": f"{s}:{g}", "source": s}
                     for j in range(1 + g % 3)]
    return rows


def test_group_pairs_and_stratified_split_are_disjoint():
    groups = group_pairs(_pairs())
    assert len(groups) == 340 and groups["cf:2"]["positives"] == ["cf para 2.0", "cf para 2.1", "cf para 2.2"]
    train, val = split_groups(groups, seed=0, val_fraction=0.05, min_val_per_source=16, max_val_per_source=1000)
    assert not set(train) & set(val) and len(train) + len(val) == 340
    val_cf = [g for g in val if g.startswith("cf:")]
    assert len(val_cf) == 16  # 5% of 40 is 2: the per-source minimum applies
    assert len(val) - len(val_cf) == 16  # 5% of 300 = 15 < 16
    # Seeded: the same split again, another seed a different one.
    assert split_groups(groups, 0, 0.05, 16, 1000) == (train, val)
    assert split_groups(groups, 1, 0.05, 16, 1000)[1] != val


def test_group_pairs_rejects_two_originals_in_one_group():
    rows = [{"anchor": "a", "positive": "b", "group": "g"}, {"anchor": "c", "positive": "d", "group": "g"}]
    with pytest.raises(ValueError, match="two different originals"):
        group_pairs(rows)


def test_group_pair_batches_never_repeat_an_original():
    groups = group_pairs(_pairs())
    ds = GroupPairs([(g["anchor"], g["positives"]) for g in groups.values()], seed=0)
    items = [ds[i] for i in range(len(ds))]
    assert len({it["anchor"] for it in items}) == len(ds)
    for it, g in zip(items, groups.values()):
        assert it["positive"] in g["positives"]
    ds.epoch = 1  # a new epoch draws other paraphrases of multi-paraphrase groups
    assert [ds[i]["positive"] for i in range(len(ds))] != [it["positive"] for it in items]


def test_resumable_sampler_draws_what_random_sampler_draws_and_replays_a_pass():
    """A fresh run shuffles exactly as ``DataLoader(shuffle=True)`` did; a resumed pass replays its order."""
    from torch.utils.data import DataLoader, RandomSampler

    from megedit.encoder.encoder_datamodule import ResumableRandomSampler

    data = list(range(37))
    torch.manual_seed(7)
    plain = [b.tolist() for _ in range(2) for b in DataLoader(data, batch_size=4, shuffle=True, drop_last=True)]
    after_plain = torch.get_rng_state()
    torch.manual_seed(7)
    sampler = ResumableRandomSampler(data)
    assert isinstance(sampler, RandomSampler)  # Lightning still swaps in a shuffled DistributedSampler under DDP
    loader = DataLoader(data, batch_size=4, sampler=sampler, drop_last=True)
    ours = [b.tolist() for b in loader]
    seed = sampler.seed
    ours += [b.tolist() for b in loader]
    assert ours == plain and torch.equal(torch.get_rng_state(), after_plain)  # same order, same RNG use
    # Replaying the first pass from its 4th batch: the same batches, and the sampler draws nothing.
    sampler.resume(seed, 3 * 4)
    assert [b.tolist() for b in loader] == plain[3:9] and sampler.seed == seed
    state = torch.get_rng_state()
    sampler.resume(seed, 3 * 4)
    assert list(sampler) == sum(plain[3:9], []) + [i for i in range(37) if i not in sum(plain[:9], [])]
    assert torch.equal(torch.get_rng_state(), state)


def test_encoder_artifact_readers(tmp_path):
    from megedit.artifacts import ArtifactError, write_manifest
    from megedit.encoder.artifact import (HELDOUT, hard_negative_groups, heldout_groups, load_encoder,
                                          write_heldout)

    # An encoder that held nothing out wrote no heldout_groups.json.
    assert heldout_groups(tmp_path) == set() and hard_negative_groups(tmp_path) == set()
    write_heldout(tmp_path, ["g2", "g1"], 0, ["p1"])
    assert (tmp_path / HELDOUT).is_file()
    assert heldout_groups(tmp_path) == {"g1", "g2"} and hard_negative_groups(tmp_path) == {"p1"}
    with pytest.raises(ArtifactError, match="no manifest.json"):
        load_encoder(tmp_path)  # unfinished: refused
    write_manifest(tmp_path, "familiarity", {}, {}, [])
    with pytest.raises(ArtifactError, match="expected a 'encoder' artifact"):
        load_encoder(tmp_path)
