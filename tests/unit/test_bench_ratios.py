"""The bench's paired ratios: pure arithmetic over samples, no servers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # bench/ is not the package

from bench.harness import Sample
from bench.scenarios import _paired_ratios


def _sample(pps: float, cpu: float | None) -> Sample:
    return Sample(sent=0, received=0, handled=0, drops=0, cpu_s=0.0, duration_s=1.0, pps=pps,
                  cpu_us_per_dgram=cpu, cpu_share=1.0, loss=0.0)


def test_a_slow_spell_hitting_both_servers_cancels_out() -> None:
    # Repetition 2 ran while the machine was twice as slow, for both servers:
    # each pair still says 2x, which a ratio of medians would not.
    this = [_sample(200, 4.0), _sample(100, 8.0), _sample(210, 4.2)]
    ref = [_sample(100, 8.0), _sample(50, 16.0), _sample(100, 8.0)]
    out = _paired_ratios(this, ref, "twisted")
    assert out["ratio_pairs_vs_twisted"] == 3
    assert out["ratio_vs_twisted"] == pytest.approx(2.0)
    assert out["ratio_vs_twisted_range"] == pytest.approx([2.0, 2.1])
    assert out["cpu_ratio_vs_twisted"] == pytest.approx(2.0)
    assert out["cpu_ratio_vs_twisted_range"] == pytest.approx([8.0 / 4.2, 2.0])


def test_pairs_without_a_measurement_are_left_out() -> None:
    this = [_sample(200, None), _sample(300, 3.0)]
    ref = [_sample(0, 6.0), _sample(100, 6.0)]
    out = _paired_ratios(this, ref, "c_echo")
    assert out["ratio_vs_c_echo"] == pytest.approx(3.0)  # the pps pair with 0 is skipped
    assert out["cpu_ratio_vs_c_echo"] == pytest.approx(2.0)  # the pair without CPU is skipped
