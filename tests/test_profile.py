"""Stage `profile`: time and FLOPs per operator type, on a model whose answer is known, and the
stage itself on the small trained checkpoint."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from oipipe.core.config import compose, path
from oipipe.core.errors import ConfigError
from oipipe.core.schema import PROFILE_MODES
from oipipe.measure import optypes
from stages import profile

N, FEATURES, OUT = 256, 1024, 768  # the matmul: 256 x 1024 @ 1024 x 768 (not square: the
C, HW = 64, 28  # the depthwise conv: 64 channels of 28 x 28, 3 x 3 kernel
MATMUL_FLOPS = 2 * N * FEATURES * OUT  # formula must pick the right dimension); 403 MFLOP, 3 MB
DEPTHWISE_FLOPS = 2 * N * C * HW * HW * 9  # 231 MFLOP on 2 x 51 MB of activations


class Known(nn.Module):
    """One large matmul (compute-bound) beside one depthwise convolution (memory-bound)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(FEATURES, OUT, bias=False)
        self.dw = nn.Conv2d(C, C, 3, padding=1, groups=C, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.contiguous()  # NCHW view for the matmul (the runtime hands channels_last)
        return self.fc(x.reshape(N, -1)[:, :FEATURES]), self.dw(x)


@pytest.fixture(scope="module")
def known() -> dict:
    torch.manual_seed(0)
    return profile.profile_model(
        Known().eval(), torch.randn(N, C, HW, HW), ["eager"], [N], iterations=3, warmup=1
    )


def test_grouping_and_flops_are_exact(known: dict) -> None:
    types = known["profiles"][f"eager@b{N}"]["types"]
    assert types[optypes.LINEAR]["flops"] == MATMUL_FLOPS
    assert types[optypes.DEPTHWISE]["flops"] == DEPTHWISE_FLOPS
    assert optypes.CONV not in types  # nothing depthwise counted as an ordinary convolution
    # the same totals as PyTorch's own counter (which does not split depthwise out)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        Known().eval()(torch.randn(N, C, HW, HW))
    assert counter.get_total_flops() == MATMUL_FLOPS + DEPTHWISE_FLOPS


def test_time_shares_sum_to_100_pct_and_intensity_tells_them_apart(known: dict) -> None:
    p = known["profiles"][f"eager@b{N}"]
    types = p["types"]
    assert sum(v["time_share_pct"] for v in types.values()) == pytest.approx(100.0, abs=1e-4)
    assert sum(v["time_ms"] for v in types.values()) == pytest.approx(p["total_ms"], rel=1e-6)
    assert types[optypes.LINEAR]["time_share_pct"] > 0
    assert types[optypes.DEPTHWISE]["time_share_pct"] > 0
    # 403 MFLOP over (1 + 3 + 0.8) MB (~80 FLOP/byte) against 231 MFLOP over 2 x 51 MB (~2.3)
    assert types[optypes.LINEAR]["intensity"] > 20 * types[optypes.DEPTHWISE]["intensity"]
    # and it shows in the speed: oneDNN's GEMM runs tens of GFLOP/s, the depthwise a few
    assert types[optypes.LINEAR]["gflops_per_s"] > 2 * types[optypes.DEPTHWISE]["gflops_per_s"]


def test_depthwise_convolution_is_told_apart_by_shapes_and_by_groups() -> None:
    x, dw_w, conv_w = [1, 64, 8, 8], [64, 1, 3, 3], [32, 64, 3, 3]
    assert optypes.op_type("aten::mkldnn_convolution", [x, dw_w]) == optypes.DEPTHWISE
    assert optypes.op_type("aten::conv2d", [x, conv_w]) == optypes.CONV
    assert optypes.op_type("convolution", [x, dw_w], groups=64) == optypes.DEPTHWISE
    assert optypes.op_type("convolution", [x, conv_w], groups=1) == optypes.CONV
    assert optypes.op_type("aten::addmm") == optypes.LINEAR
    assert optypes.op_type("aten::no_such_op") is None


def fake(types: dict[str, tuple[float, float]]) -> dict:
    """A profile dict from (time share, FLOP share) per type, in percent."""
    return {
        "profiles": {
            "eager@b32": {
                "mode": "eager",
                "batch": 32,
                "total_ms": 10.0,
                "types": {
                    k: {
                        "time_share_pct": t,
                        "flop_share_pct": f,
                        "time_ms": t / 10,
                        "gflops_per_s": 2.1,
                        "intensity": 3.0,
                    }
                    for k, (t, f) in types.items()
                },
            }
        }
    }


def test_paragraph_names_the_memory_bound_types_with_figures() -> None:
    text = optypes.paragraph(
        fake({optypes.DEPTHWISE: (31, 4), optypes.CONV: (50, 90), optypes.OTHER: (19, 6)})
    )
    assert "memory-bound" in text
    assert "depthwise convolution: 31% of time, 4% of FLOPs, 2.1 GFLOP/s, 3.0 FLOP/byte" in text
    assert "convolution: 50% of time, 90% of FLOPs" in text  # the comparison, not a culprit
    balanced = optypes.paragraph(fake({optypes.DEPTHWISE: (10, 10), optypes.CONV: (90, 90)}))
    assert "no operator type" in balanced


def test_known_model_paragraph_says_depthwise_is_memory_bound(known: dict) -> None:
    types = known["profiles"][f"eager@b{N}"]["types"]
    bound = known["memory_bound"][f"eager@b{N}"]
    if types[optypes.DEPTHWISE]["time_share_pct"] >= 2 * types[optypes.DEPTHWISE]["flop_share_pct"]:
        assert optypes.DEPTHWISE in bound and "depthwise convolution:" in known["paragraph"]
    assert optypes.LINEAR not in bound


def test_modes_registry_matches_config() -> None:
    assert set(profile.MODES) == set(PROFILE_MODES)
    with pytest.raises(ConfigError, match="profile.modes"):
        compose(["profile.modes=[eager,tensorrt]"])


def test_stage_writes_metrics_csv_and_chart(make_cfg, prepared: Path, trained: Path) -> None:
    cfg = make_cfg(
        f"paths.prepared={prepared}",
        f"paths.models={trained.parent}",
        "profile.modes=[eager]",
        "profile.batch_sizes=[1,4]",
        "profile.iterations=2",
        "profile.warmup=1",
    )
    result = profile.run(cfg)
    saved = json.loads((path(cfg, "metrics") / "profile.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert set(saved["profiles"]) == {"eager@b1", "eager@b4"}
    for p in saved["profiles"].values():
        types = p["types"]
        assert sum(v["time_share_pct"] for v in types.values()) == pytest.approx(100.0, abs=1e-4)
        # efficientnet_lite0: regular and depthwise convolutions, batch norms, relu6, a linear head
        assert {optypes.CONV, optypes.DEPTHWISE, optypes.BATCH_NORM, optypes.LINEAR} <= set(types)
    assert saved["paragraph"] == optypes.paragraph(saved)
    with open(path(cfg, "plots") / "profile.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["mode"] for r in rows} == {"eager"} and {r["batch"] for r in rows} == {"1", "4"}
    assert (path(cfg, "plots") / "profile.png").stat().st_size > 1000
