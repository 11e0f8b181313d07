"""Damaged `.lvp` streams through `lvpnet.decompress`: an `lvpnet.errors` exception or the exact
original, never other pixels, no hang (10 s per input), bounded memory (peak RSS growth <= 200 MB).

`make test` runs FUZZ_INPUTS (default 300) inputs; `make soak` runs 1,000 and more.  A failure
names its input index: `FUZZ_SEED=s` and the index reproduce it (tests/reliability/fuzzing.py).
"""

from __future__ import annotations

import os

from tests.reliability.fuzzing import FORGED_HEADER, report, run_campaign

INPUTS = int(os.environ.get("FUZZ_INPUTS", "300"))
SEED = int(os.environ.get("FUZZ_SEED", "20260806"))
RSS_LIMIT_MB = 200


def test_corrupted_streams_never_decode_to_other_pixels() -> None:
    # 3 images x 2 models in the soak; 2 x 2 in the short run (the encode is the fixed cost)
    campaign = run_campaign("codec", INPUTS, seed=SEED, images=3 if INPUTS >= 1000 else 2)
    summary = report(campaign)
    print(summary)
    assert campaign.failures == [], summary
    assert sum(campaign.outcomes.values()) == INPUTS
    assert set(campaign.outcomes) <= {"error", "exact", "reinterpreted", "foreign"}
    # Accidental damage (flips, cuts, splices: what a disk does) is always caught by a CRC or a
    # SHA-256; the same samples under another shape/signedness need a header forged with a valid CRC
    for kind, outcomes in campaign.by_kind.items():
        if kind not in FORGED_HEADER:
            assert set(outcomes) <= {"error", "exact"}, (kind, outcomes)
    # The CRC-fixed payload mutations reach the entropy decoder and the model: the SHA-256s stop them
    assert campaign.by_kind["payload-crc"]["error"] > 0
    assert summary["rss_peak_growth_mb"] <= RSS_LIMIT_MB, summary
