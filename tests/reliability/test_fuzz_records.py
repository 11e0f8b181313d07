"""Damaged archive records through `parse_record` + `rebuild_file`: an exception (every caller
treats any as corruption) or the original, or other bytes that the SHA-256 comparison every
caller makes refuses; never a hang or a crash, bounded memory.  A damaged LVPNet pixel section
must never rebuild to other bytes at all (its stream carries per-frame SHA-256).

RECORD_FUZZ_INPUTS (default 200) inputs in `make test`; `make soak` runs 1,000.
"""

from __future__ import annotations

import os

from tests.reliability.fuzzing import report, run_campaign

INPUTS = int(os.environ.get("RECORD_FUZZ_INPUTS", "200"))
SEED = int(os.environ.get("FUZZ_SEED", "20260806"))
RSS_LIMIT_MB = 200


def test_corrupted_records_never_pass_for_the_original() -> None:
    campaign = run_campaign("record", INPUTS, seed=SEED, images=2)
    summary = report(campaign)
    print(summary)
    assert campaign.failures == [], summary
    assert sum(campaign.outcomes.values()) == INPUTS
    assert set(campaign.outcomes) <= {"error", "exact", "other-bytes-refused-by-sha256"}
    assert "other-bytes-refused-by-sha256" not in campaign.by_kind.get("section-flip:lvpnet", {}), summary
    assert summary["rss_peak_growth_mb"] <= RSS_LIMIT_MB, summary
