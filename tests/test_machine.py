"""oipipe.measure.machine: CPU, GPU and library facts, gathered without importing torch."""

from __future__ import annotations

import stat
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from oipipe.core.config import PROJECT_ROOT
from oipipe.measure import machine

KEYS = [
    "oi_pipeline",
    "cpu",
    "cores",
    "native_bf16",
    "cpu_flags_relevant",
    "gpu",
    "gpu_driver",
    "cuda",
    "python",
    "platform",
    "torch",
    "torchvision",
    "onnxruntime",
    "torchao",
    "torch_tensorrt",
    "tensorrt",
]


def fake_nvidia_smi(folder: Path, stdout: str, code: int = 0) -> Path:
    """An `nvidia-smi` on PATH that prints `stdout`, exits with `code`, and logs its arguments."""
    folder.mkdir(parents=True, exist_ok=True)
    exe = folder / "nvidia-smi"
    exe.write_text(
        f"#!/bin/sh\necho \"$@\" >> '{folder}/args'\nprintf '%s' '{stdout}'\nexit {code}\n"
    )
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return folder / "args"


@pytest.fixture
def only_fake_path(tmp_path, monkeypatch) -> Path:
    """PATH holding only a folder for a fake nvidia-smi, and every GPU visible."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return bin_dir


def test_gpu_name_and_driver_come_from_nvidia_smi(only_fake_path) -> None:
    args = fake_nvidia_smi(
        only_fake_path, "NVIDIA H100 80GB HBM3, 570.86.15\nNVIDIA H100 80GB HBM3, 570.86.15\n"
    )
    info = machine.machine_info()
    assert (info["gpu"], info["gpu_driver"]) == ("NVIDIA H100 80GB HBM3", "570.86.15")
    assert args.read_text().split() == ["--query-gpu=name,driver_version", "--format=csv,noheader"]
    import torch  # the test process has it anyway; the module must read the same without it

    assert info["cuda"] == torch.version.cuda


def test_cuda_visible_devices_picks_or_hides_the_gpu(only_fake_path, monkeypatch) -> None:
    args = fake_nvidia_smi(only_fake_path, "Tesla T4, 535.1\n")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,0")
    assert machine.gpu_info() == ("Tesla T4", "535.1")
    assert "--id=2" in args.read_text().split()
    for hidden in ("", "-1"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        assert machine.gpu_info() == (None, None)


@pytest.mark.parametrize("stdout, code", [("", 0), ("NVIDIA-SMI has failed\n", 9)])
def test_no_gpu_when_nvidia_smi_fails(only_fake_path, stdout, code) -> None:
    fake_nvidia_smi(only_fake_path, stdout, code)
    info = machine.machine_info()
    assert (info["gpu"], info["gpu_driver"], info["cuda"]) == (None, None, None)


def test_no_gpu_without_nvidia_smi(only_fake_path) -> None:
    info = machine.machine_info()
    assert (info["gpu"], info["gpu_driver"], info["cuda"]) == (None, None, None)
    assert list(info) == KEYS


def test_relevant_cpu_flags_and_native_bf16(monkeypatch) -> None:
    flags = "fpu sse2 avx2 avx512f avx512_vnni amx_tile avx_vnni avx512_bf16 sha_ni"
    monkeypatch.setattr(machine, "cpuinfo", lambda: {"model name": "Test CPU", "flags": flags})
    info = machine.machine_info()
    assert info["cpu"] == "Test CPU"
    assert info["cpu_flags_relevant"] == [
        "amx_tile",
        "avx512_bf16",
        "avx512_vnni",
        "avx512f",
        "avx_vnni",
    ]
    assert info["native_bf16"] is True
    monkeypatch.setattr(machine, "cpuinfo", lambda: {"flags": "fpu avx2 avx512f"})
    assert machine.cpu_flags() == {"fpu", "avx2", "avx512f"}
    assert machine.cpu_has_native_bf16() is False
    assert machine.machine_info()["cpu_flags_relevant"] == ["avx512f"]


def test_library_versions_from_package_metadata() -> None:
    info = machine.machine_info()
    assert info["torch"] == metadata.version("torch")
    assert info["onnxruntime"] == metadata.version("onnxruntime")
    assert machine.library_version("no-such-package-oi-pipeline") is None


def test_machine_facts_do_not_import_torch() -> None:
    code = (
        "import sys, oipipe.measure.machine as m; info = m.machine_info(); "
        "assert 'torch' not in sys.modules, 'torch imported'; print(info['torch'])"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == metadata.version("torch")


def test_one_answer_to_whether_the_cpu_has_native_bf16() -> None:
    # Training once asked torch's private probes (torch.cpu._is_avx512_bf16_supported,
    # _is_amx_tile_supported) while optimize read /proc/cpuinfo: two answers that could
    # disagree. machine.cpu_has_native_bf16 is the one; nothing else asks the CPU itself.
    probes = (
        "/proc/cpuinfo",
        "torch.cpu._is_",
        "_is_avx512_bf16_supported",
        "_is_amx_tile_supported",
    )
    files = [
        f
        for folder in ("stages", "oipipe", "oitools", "oimirror", "benchmarks")
        for f in (PROJECT_ROOT / folder).rglob("*.py")
        if f != PROJECT_ROOT / "oipipe" / "measure" / "machine.py"
    ]
    askers = [
        f"{f.relative_to(PROJECT_ROOT)}: {p}"
        for f in sorted(files)
        for p in probes
        if p in f.read_text()
    ]
    assert not askers, askers


def test_the_project_version_is_the_installed_distributions() -> None:
    from importlib import metadata

    assert machine.machine_info()["oi_pipeline"] == metadata.version("oi-pipeline")
