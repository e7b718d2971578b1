"""recloop.memory.PhasePeaks: the peak of each phase, not of the process so far."""
import sys

import numpy as np
import pytest

from recloop.memory import PhasePeaks, peak_rss_bytes


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the resettable high-water mark is Linux's")
def test_each_phase_gets_its_own_peak():
    peaks = PhasePeaks()
    big = np.ones(300 * 2**20 // 8)  # 300 MiB, touched, freed before the phase ends: only its peak remains
    del big
    peaks.mark("big")
    small = np.ones(2**20 // 8)
    del small
    peaks.mark("small")
    assert peaks.exact
    assert list(peaks.mib) == ["big", "small"]
    # without the reset the second phase would report the first one's peak
    assert peaks.mib["big"] - peaks.mib["small"] > 200, peaks.mib
    assert peak_rss_bytes() > 0
