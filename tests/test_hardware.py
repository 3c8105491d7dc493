"""What `hardware.py` measures must not disturb the run it measures for; what it sets up for a CPU holds."""

import json
import platform
import subprocess
import sys

import pytest
import torch

from ptmcli.hardware import Hardware, peak_flops


def test_measuring_the_cpu_peak_leaves_the_random_stream_alone(tmp_path, monkeypatch):
    """A run on a cold PTM_CACHE (the peak measured) draws the same dropout masks as on a warm one (read back)."""
    monkeypatch.setenv("PTM_CACHE", str(tmp_path))
    torch.manual_seed(0)
    state = torch.get_rng_state()
    assert peak_flops(Hardware(device=torch.device("cpu"), dtype=torch.float32)) > 0
    assert (tmp_path / f"cpu-peak-{torch.get_num_threads()}-threads.json").exists()
    assert torch.equal(torch.get_rng_state(), state)


def test_a_bf16_run_on_a_cpu_is_measured_against_bf16_products(tmp_path, monkeypatch):
    """Under bf16 autocast the products run in bf16 (~6x fp32's rate where the CPU has AMX): its MFU is read against
    the rate of bf16 products, kept apart from fp32's."""
    from ptmcli import hardware

    monkeypatch.setenv("PTM_CACHE", str(tmp_path))
    assert hardware.cpu_matmul_rate(0.01, torch.bfloat16) > 0  # the real measurement takes the dtype
    measured = []
    monkeypatch.setattr(hardware, "cpu_matmul_rate", lambda dtype: measured.append(dtype) or len(measured) * 1e9)
    for dtype in (torch.bfloat16, torch.float32, torch.bfloat16):
        peak_flops(Hardware(device=torch.device("cpu"), dtype=dtype))
    assert measured == [torch.bfloat16, torch.float32]  # the second bf16 run reads the first one's back
    threads = torch.get_num_threads()
    assert json.loads((tmp_path / f"cpu-peak-{threads}-threads-bfloat16.json").read_text())["flops"] == 1e9
    assert json.loads((tmp_path / f"cpu-peak-{threads}-threads.json").read_text())["flops"] == 2e9


FRESH_BLOCK_FAULTS = """
import json, resource, torch
from ptmcli import hardware
from ptmcli.distributed import Dist
from ptmcli.schema import HardwareConfig

def faults():  # page faults while a 64 MB tensor is allocated and written (and then freed)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 << 20)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = [faults() for _ in range(2)]
hardware.resolve(HardwareConfig(device="cpu"), Dist())
print(json.dumps([default, [faults() for _ in range(4)]]))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_on_a_cpu_a_freed_block_comes_back_without_page_faults():
    """By default glibc maps a 64 MB block afresh at every allocation (16,384 page faults each time); once ptm has
    set up a CPU run, the allocations after the first reuse its pages (in a fresh interpreter: this one may have
    set up a run already). Now and then one of them still faults afresh (3 of 36 here, never two in a run, also
    with a single malloc arena; the cause was not found), so two of the three must reuse the pages."""
    out = subprocess.run([sys.executable, "-c", FRESH_BLOCK_FAULTS], capture_output=True, text=True, check=True)
    default, kept = json.loads(out.stdout)
    assert min(default) > 10_000 and sorted(kept[1:])[1] < 100, out.stdout
