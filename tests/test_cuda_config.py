"""Host-side settings of the CUDA backward that need no GPU: the dS workspace budget from the
environment, and the shared-memory layout the launcher gives bwd_dq_ds_sm90."""

import importlib

import pytest

from vsa_nd.backends import cuda_attention


@pytest.mark.parametrize("text, expected", [("", 0), ("0", 0), ("1.5", 3 << 29), (" 16 ", 16 << 30)])
def test_workspace_budget_from_environment(monkeypatch, text, expected):
    monkeypatch.setenv("VSA_ND_DS_WORKSPACE_GIB", text)
    assert cuda_attention._workspace_default() == expected


@pytest.mark.parametrize("text", ["lots", "-1"])
def test_bad_workspace_budget_is_refused(monkeypatch, text):
    monkeypatch.setenv("VSA_ND_DS_WORKSPACE_GIB", text)
    with pytest.raises(ValueError, match="VSA_ND_DS_WORKSPACE_GIB"):
        cuda_attention._workspace_default()


def test_module_reads_the_budget_at_import(monkeypatch):
    monkeypatch.setenv("VSA_ND_DS_WORKSPACE_GIB", "2")
    try:
        assert importlib.reload(cuda_attention).DS_WORKSPACE_BYTES == 2 << 30
    finally:
        monkeypatch.delenv("VSA_ND_DS_WORKSPACE_GIB")
        importlib.reload(cuda_attention)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("stages", [1, 2, 3, 4])
def test_dq_ds_layout_fits_its_ctas(head_dim, stages):
    """The layout leaves room for at least the kernel's minimum list, and as many CTAs per SM
    (228 KB, 1 KB reserved per CTA) as the kernel's __launch_bounds__ assume (DqDsSmem::CTAS)."""
    tile = 64 * head_dim * 2
    smem, room = cuda_attention._dq_ds_layout(tile, stages)
    fixed = stages * (tile + 64 * 64 * 2 + 8)
    assert smem == fixed + 12 * room
    assert cuda_attention._DQDS_MIN_LIST <= room <= cuda_attention._LIST_CAP
    ctas = min(4, 228 * 1024 // (fixed + 12 * cuda_attention._DQDS_MIN_LIST + 1024))
    assert ctas * (smem + 1024) <= 228 * 1024
