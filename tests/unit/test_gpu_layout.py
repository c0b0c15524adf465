"""The job side's gpu-layout step: RELION's --gpu string from the GPUs Slurm assigned, and gpus.json."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.jobside.gpus import NoGpuError, device_string, gpu_layout, visible_devices


@pytest.mark.parametrize(
    ("ranks", "devices", "expected"),
    [
        (1, 1, "0"),  # sequential relion_refine: its threads share the devices of its one group
        (1, 3, "0,1,2"),
        (2, 1, "0"),  # leader + 1 follower: the leader computes nothing and gets no group
        (3, 2, "0:1"),
        (5, 2, "0:1:0:1"),  # followers spread evenly: follower i -> ordinal (i-1) % k
        (4, 4, "0:1:2"),
        (9, 4, "0:1:2:3:0:1:2:3"),
    ],
)
def test_device_string_gives_each_follower_one_group(ranks: int, devices: int, expected: str) -> None:
    assert device_string(ranks, devices)[0] == expected


def test_more_followers_than_devices_is_said() -> None:
    assert device_string(5, 2)[1] == ["4 ranks share 2 devices"]
    assert device_string(3, 2)[1] == [] and device_string(1, 4)[1] == []
    assert device_string(2, 3)[1] == ["1 follower ranks for 3 devices: ordinals 1,2 stay idle"]


@pytest.mark.parametrize(
    ("environ", "source", "count"),
    [
        ({"CUDA_VISIBLE_DEVICES": "2,3", "SLURM_JOB_GPUS": "2,3"}, "CUDA_VISIBLE_DEVICES", 2),
        ({"CUDA_VISIBLE_DEVICES": "GPU-8f6a2b1c-0000-1111-2222-333344445555"}, "CUDA_VISIBLE_DEVICES", 1),
        ({"CUDA_VISIBLE_DEVICES": "0,-1,1"}, "CUDA_VISIBLE_DEVICES", 1),  # CUDA stops at -1
        ({"CUDA_VISIBLE_DEVICES": "", "SLURM_JOB_GPUS": "0"}, "CUDA_VISIBLE_DEVICES", 0),  # set empty: none visible
        ({"CUDA_VISIBLE_DEVICES": "NoDevFiles"}, "CUDA_VISIBLE_DEVICES", 0),
        ({"SLURM_JOB_GPUS": "1,3,5"}, "SLURM_JOB_GPUS", 3),
        ({}, "SLURM_JOB_GPUS", 0),
    ],
)
def test_visible_devices(environ: dict[str, str], source: str, count: int) -> None:
    assert visible_devices(environ)[0::2] == (source, count)


def test_the_ordinals_are_cudas_not_slurms() -> None:
    # Slurm gave GPUs 4 and 5; CUDA inside the job calls them 0 and 1.
    layout = gpu_layout({"CUDA_VISIBLE_DEVICES": "4,5"}, ranks=3, mode="2d")
    assert (layout.visible_devices, layout.device_string, layout.warnings) == ("4,5", "0:1", [])


def test_the_slurm_fallback_warns_about_its_assumption() -> None:
    layout = gpu_layout({"SLURM_JOB_GPUS": "4,5"}, ranks=1)
    assert layout.device_string == "0,1" and layout.source == "SLURM_JOB_GPUS"
    assert "CUDA_VISIBLE_DEVICES is unset" in layout.warnings[0]


def test_no_device_is_an_error_naming_the_variable() -> None:
    with pytest.raises(NoGpuError, match="CUDA_VISIBLE_DEVICES is unset, SLURM_JOB_GPUS is unset"):
        gpu_layout({}, ranks=3)
    with pytest.raises(NoGpuError, match="CUDA_VISIBLE_DEVICES=''"):
        gpu_layout({"CUDA_VISIBLE_DEVICES": ""}, ranks=3)


def run_layout(tmp_path: Path, ranks: int, **environ: str) -> subprocess.CompletedProcess[str]:
    """The step as the template runs it: isolated, from /, in an environment holding only Slurm's variables."""
    env = {"PATH": os.environ["PATH"], **environ}
    argv = [sys.executable, "-I", "-m", "gateway.jobside", "gpu-layout", "--mode", "3d", "--ranks", str(ranks), "--log-dir", str(tmp_path)]
    return subprocess.run(argv, cwd="/", env=env, capture_output=True, text=True, timeout=60)


def test_the_command_prints_the_string_and_records_gpus_json(tmp_path: Path) -> None:
    result = run_layout(tmp_path, 4, CUDA_VISIBLE_DEVICES="2,3", SLURM_JOB_GPUS="2,3")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "0:1:0\n"
    assert "gpu-layout: 3 ranks share 2 devices" in result.stderr
    record = json.loads((tmp_path / "gpus.json").read_text())
    assert record == {
        "visible_devices": "2,3",
        "device_string": "0:1:0",
        "ranks": 4,
        "mode": "3d",
        "source": "CUDA_VISIBLE_DEVICES",
        "warnings": ["3 ranks share 2 devices"],
    }


def test_the_command_fails_clearly_without_devices(tmp_path: Path) -> None:
    result = run_layout(tmp_path, 3)
    assert result.returncode != 0 and result.stdout == ""
    assert result.stderr.startswith("gpu-layout failed: no GPU is visible to this job (CUDA_VISIBLE_DEVICES is unset")
    assert not (tmp_path / "gpus.json").exists()


def test_the_layout_module_is_standard_library_only() -> None:
    code = (
        "import sys; before = set(sys.modules); import gateway.jobside.gpus\n"
        "print(sorted(m for m in set(sys.modules) - before if m.split('.')[0] not in sys.stdlib_module_names and m.split('.')[0] != 'gateway'))"
    )
    loaded = subprocess.run([sys.executable, "-I", "-c", code], cwd="/", capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    assert loaded == "[]"
