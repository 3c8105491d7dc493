"""What `hardware.py` measures must not disturb the run it measures for."""

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
