"""How far from the limit: the peaks' method, the traffic count, a row's point, and labels that
do not overlap on the charts."""

from __future__ import annotations

import itertools
import time

import pytest
import torch

from oipipe.measure import roofline
from oipipe.reporting.plots import figure, place_labels


def test_the_best_rate_is_the_fastest_call() -> None:
    """Calls that sleep 20 ms, one of them 120 ms (a burst): the best call gives 50 per second
    of work; sleep never returns early, so never more."""
    durations = itertools.chain([0.02, 0.12], itertools.repeat(0.02))
    rate = roofline._best_rate(lambda: time.sleep(next(durations)), 1.0, "cpu", 0.3)
    assert 40 < rate <= 50


def test_peaks_and_bandwidth_are_measured_per_precision() -> None:
    peaks = roofline.measure_peaks({"cpu": {"int8", "bf16"}})["cpu"]
    # fp32 always, the asked precisions, the copy; each a positive rate a 2-core CPU can reach
    for key in ("fp32_gflops", "bf16_gflops", "int8_gops", "bandwidth_gbs"):
        assert 0 < peaks[key] < 20_000, (key, peaks)
    assert "fp16_gflops" not in peaks and peaks["threads"] == torch.get_num_threads()


def test_traffic_counts_weights_once_and_activations_per_image() -> None:
    """Flatten and a Linear(48, 10) on 3x4x4 images: weight 1920 bytes and bias 40 per call,
    whatever the batch; per image its input (192 bytes) and output (40), fp32. Flatten and the
    weight's transpose are views: no bytes."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 10))
    assert roofline.traffic(model, 4) == (1960.0, 232.0)


def test_a_rows_point_uses_its_width_batch_and_precisions_peak() -> None:
    peaks = {"cpu": {"fp32_gflops": 100.0, "int8_gops": 400.0, "bandwidth_gbs": 20.0}}
    row = {"batch": 32, "precision": "int8", "device": "cpu", "gflops_per_s": 40.0}
    got = roofline.point(row, 1e9, 1e6, 1e7, peaks)
    assert got["intensity_flop_per_byte"] == pytest.approx(32e9 / ((1e6 + 32e7) / 4), abs=1e-3)
    assert got["peak_gflops"] == 400.0 and got["peak_pct"] == 10.0  # against int8's, not fp32's
    fp32 = roofline.point({**row, "precision": "fp32"}, 1e9, 1e6, 1e7, peaks)
    assert fp32["peak_pct"] == 40.0
    assert fp32["intensity_flop_per_byte"] == pytest.approx(
        got["intensity_flop_per_byte"] / 4, abs=1e-3
    )
    assert roofline.point({**row, "precision": "bf16"}, 1e9, 1e6, 1e7, peaks)["peak_pct"] is None


def test_labels_of_crowded_points_do_not_overlap(tmp_path) -> None:
    """Fifteen variants at one accuracy, their speeds close: every label finds a place."""
    points = [(100 * 1.06**k, 95.0) for k in range(15)]
    labels = [f"variant_name_{k}" for k in range(15)]
    with figure(tmp_path / "c.png", figsize=(7.5, 4.8)) as ax:
        ax.plot(*zip(*points, strict=True), "o")
        ax.set_xscale("log")
        ax.set_ylim(90, 100)
        anns = place_labels(ax, points, labels, fontsize=7)
        renderer = ax.figure.canvas.get_renderer()
        boxes = [a.get_window_extent(renderer) for a in anns]
    assert [a.get_text() for a in anns] == labels
    for (i, a), (j, b) in itertools.combinations(enumerate(boxes), 2):
        assert not a.overlaps(b), (labels[i], labels[j])
