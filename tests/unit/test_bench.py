"""scripts/bench's ratios round by round: each round's own sides, the best hand side."""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "scripts"))
import bench  # noqa: E402


def rows(*seconds: float) -> list[tuple[float, int, float]]:
    return [(s, 1024, 0.5) for s in seconds]


def test_each_round_against_its_own_best_hand_side():
    res = {"full_libvbackup": rows(1.1, 1.3, 2.0), "full_nbdcopy": rows(1.0, 1.0, 1.6),
           "full_qemu_img": rows(1.2, 0.9, 2.0), "inc_empty": rows(0.25, 0.2, 0.3),
           "inc_empty_hand": rows(0.1, 0.15, 0.1)}
    out = bench.round_ratios(res)
    assert set(out) == {"full_vs_best_hand", "inc_empty_minus_hand_seconds"}
    assert [round(x, 4) for x in out["full_vs_best_hand"]] == [1.1, round(1.3 / 0.9, 4), 1.25]
    assert [round(x, 4) for x in out["inc_empty_minus_hand_seconds"]] == [0.15, 0.05, 0.2]


def test_a_side_missing_or_short_of_rounds_gives_no_row():
    res = {"push_full_libvbackup": rows(1.0, 1.1), "push_full_libvirt": rows(1.0),
           "restore_libvbackup": rows(1.0)}
    assert bench.round_ratios(res) == {}
