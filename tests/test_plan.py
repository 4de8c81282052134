from collections import Counter

import pytest

from mcat_ds.data.plan import ExampleSelection, count_plan, deal_to_rank, plan_epoch
from mcat_ds.data.shards import IndexEntry

LANGS = ("eng", "deu", "fra", "cmn", "jpn")


def fake_index(per_language=None) -> list[IndexEntry]:
    per_language = per_language or {"eng": 50, "deu": 30, "fra": 12, "cmn": 5, "jpn": 3}
    entries = []
    for code, count in per_language.items():
        for i in range(count):
            translations = tuple(t for t in LANGS if t != code and (i + len(t)) % 4 != 0)
            entries.append(IndexEntry(f"{code}_{i}", "s.tar", (0, 1), (1, 1), code, 2.0, 20, translations))
    return entries


def test_asr_caps_per_language_with_a_choice_fixed_across_epochs():
    entries = fake_index()
    selection = ExampleSelection("asr", ("eng", "deu", "cmn"), max_per_language=10)
    epoch0, epoch1 = plan_epoch(entries, selection, 7, 0), plan_epoch(entries, selection, 7, 1)
    per_language = Counter(example.src for example in epoch0)
    assert per_language == {"eng": 10, "deu": 10, "cmn": 5}
    assert {e.entry for e in epoch0} == {e.entry for e in epoch1}  # the same balanced subset
    assert [e.entry for e in epoch0] != [e.entry for e in epoch1]  # in a new order
    assert {e.entry for e in plan_epoch(entries, selection, 8, 0)} != {e.entry for e in epoch0}  # seeded
    assert all(entries[e.entry].language == e.src and e.tgt is None and e.task == "asr" for e in epoch0)


def test_srt_caps_per_direction():
    entries = fake_index()
    selection = ExampleSelection("srt", LANGS, max_per_direction=4)
    plan = plan_epoch(entries, selection, 0, 0)
    directions = Counter((e.src, e.tgt) for e in plan)
    available = Counter((e.language, t) for e in entries for t in e.translations)
    for (src, tgt), count in available.items():
        assert directions[(src, tgt)] == min(4, count)
    assert all(e.tgt in entries[e.entry].translations and e.tgt != e.src for e in plan)
    assert plan_epoch(entries, selection, 0, 0) == plan
    assert sorted(plan_epoch(entries, selection, 0, 1), key=str) == sorted(plan, key=str)


def test_smt_draws_targets_within_the_language_set_each_epoch():
    entries = fake_index()
    selection = ExampleSelection("smt", ("eng", "deu", "fra"), targets_per_utterance=1)
    plan0, plan1 = plan_epoch(entries, selection, 3, 0), plan_epoch(entries, selection, 3, 1)
    assert all(e.src in ("eng", "deu", "fra") and e.tgt in ("eng", "deu", "fra") and e.src != e.tgt for e in plan0)
    eligible = [i for i, e in enumerate(entries) if e.language in ("eng", "deu", "fra")
                and any(t in ("eng", "deu", "fra") for t in e.translations)]
    assert sorted(e.entry for e in plan0) == eligible  # each utterance once per epoch
    assert {(e.entry, e.tgt) for e in plan0} != {(e.entry, e.tgt) for e in plan1}  # targets redrawn
    two = plan_epoch(entries, ExampleSelection("smt", ("eng", "deu", "fra"), targets_per_utterance=2), 3, 0)
    assert len(two) > len(plan0)


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_ranks_get_disjoint_equal_shares(world):
    plan = plan_epoch(fake_index(), ExampleSelection("asr", LANGS), 0, 0)
    shares = [deal_to_rank(plan, rank, world) for rank in range(world)]
    assert len({len(share) for share in shares}) == 1 and len(shares[0]) == len(plan) // world
    seen = [id(example) for share in shares for example in share]
    assert len(seen) == len(set(seen))
    assert len(plan) - sum(map(len, shares)) < world


def test_counts_before_and_after_caps():
    counts = count_plan(fake_index(), ExampleSelection("srt", ("eng", "cmn"), max_per_direction=3), 0)
    assert counts.languages == {"eng": (50, 50), "cmn": (5, 5)}
    assert counts.directions["eng_cmn"][1] == 3 and counts.directions["cmn_eng"][1] == min(3, counts.directions["cmn_eng"][0])
    assert counts.examples == counts.directions["eng_cmn"][1] + counts.directions["cmn_eng"][1]
