"""Hypothesis profiles for the property tests.

"ci" (the default) keeps tests/test_properties.py to about 30-60 s on a 2-core
CPU. "long" (HYPOTHESIS_PROFILE=long) runs 20 times as many examples, for a
local soak run of some minutes. Both draw fresh random examples on every run
(no derandomize). On a failure, Hypothesis prints the falsifying example and a
@reproduce_failure blob. No example database is written: CI is stateless, and
a soak run should not depend on what an earlier run found.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
SCALE = {"ci": 1, "long": 20}

_common = dict(
    deadline=None,  # the first call of a shape compiles numba kernels; timing is not under test
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("ci", max_examples=100, **_common)
settings.register_profile("long", max_examples=2000, **_common)
if PROFILE not in SCALE:
    raise ValueError(f"HYPOTHESIS_PROFILE={PROFILE!r}: use one of {sorted(SCALE)}")
settings.load_profile(PROFILE)


def examples(ci_count: int) -> settings:
    """Settings for a test that runs `ci_count` examples under "ci" (20x that under "long")."""
    return settings(max_examples=ci_count * SCALE[PROFILE])
