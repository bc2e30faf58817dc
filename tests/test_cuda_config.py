"""Host-side settings of the CUDA backward that need no GPU: the dS workspace budget from the
environment, how a call's (batch, kv head) pairs are split within it, the shared-memory
layout the launcher gives the Hopper forward, bwd_dkdv_sm90 and bwd_dq_ds_sm90, and the size limits checked
before any launch."""

import importlib
import re
from types import SimpleNamespace

import numpy as np
import pytest

from vsa_nd import kernels
from vsa_nd.backends import cuda_attention


@pytest.mark.parametrize("text, expected", [("", 2 << 30), ("0", 0), ("1.5", 3 << 29), (" 16 ", 16 << 30)])
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


def _kernel_stages(source: str, name: str) -> dict:
    """{head dim: stages} of a kernel source's ``constexpr int NAME = D == 64 ? a : b;``."""
    text = (kernels.KERNEL_DIR / source).read_text(encoding="utf-8")
    found = re.search(rf"constexpr int {name} = D == 64 \? (\d) : (\d);", text)
    assert found, f"{name}<D> not found in {source}"
    return {64: int(found[1]), 128: int(found[2])}


def test_dkdv_stages_are_the_kernels_and_leave_room_for_its_ctas():
    """The launcher's Q/dO stage count per head dim is the kernel's DKDV_STAGES<D> (read from its
    source: the kernel does not check the shared memory it is given), and the shared memory the
    launcher asks for with it lets the kernel's DKDV_CTAS<D> CTAs share an SM (228 KB, 1 KB
    reserved per CTA): three at head dim 64, two at 128."""
    assert cuda_attention._DKDV_STAGES == _kernel_stages("attention_bwd_sm90.cu", "DKDV_STAGES")
    ctas = _kernel_stages("attention_bwd_sm90.cu", "DKDV_CTAS")
    assert ctas == {64: 3, 128: 2}
    for head_dim in cuda_attention._DKDV_STAGES:
        shared = cuda_attention._dkdv_shared_bytes(head_dim, 64 * head_dim * 2)
        assert ctas[head_dim] * (shared + 1024) <= 228 * 1024, head_dim


@pytest.mark.parametrize("card, khz, bits, fast", [("H100 SXM", 2_619_000, 5120, False), ("H200", 3_201_000, 6144, True),
                                                    ("A100 80GB", 1_593_000, 5120, False)])
def test_dram_bandwidth_of_known_cards(card, khz, bits, fast):
    """The bandwidth from the driver's memory clock and bus width matches the cards' data sheets
    (H100 SXM 3.35 TB/s, H200 4.8 TB/s, A100 80GB 2.04 TB/s) within 3%, and falls on the side of
    the hand-over's threshold that was measured for it."""
    sheet = {"H100 SXM": 3.35e12, "H200": 4.8e12, "A100 80GB": 2.039e12}[card]
    bandwidth = cuda_attention.dram_bytes_per_s(khz, bits)
    assert abs(bandwidth / sheet - 1) < 0.03, bandwidth
    assert (bandwidth >= cuda_attention._DS_FAST_DRAM) == fast


@pytest.mark.parametrize("bandwidth, expected", [(0.0, (128,)), (3.35e12, (128,)), (4.9e12, (128, 64))])
def test_ds_head_dims_follow_the_dram_bandwidth(monkeypatch, bandwidth, expected):
    """Head dim 128 hands dS over on every device, 64 only where the DRAM serves >= 4 TB/s (an
    H200, not an H100), and a driver that does not say (0) counts as slow."""
    monkeypatch.setattr(cuda_attention, "_dram_bytes_per_s", lambda device_id: bandwidth)
    assert cuda_attention.ds_head_dims(0) == expected


def test_forward_stages_are_the_kernels_and_leave_room_for_four_ctas():
    """The launcher's K/V stage count per head dim is block_sparse_fwd_sm90's FWD_STAGES<D> (read
    from its source), and the shared memory the launcher asks for with it lets the four CTAs per
    SM of its __launch_bounds__ share an SM."""
    assert cuda_attention._FWD_STAGES == _kernel_stages("attention_fwd_sm90.cu", "FWD_STAGES")
    assert "__launch_bounds__(vsa::ATT_THREADS, 4)" in (kernels.KERNEL_DIR / "attention_fwd_sm90.cu").read_text()
    for head_dim in cuda_attention._FWD_STAGES:
        shared = cuda_attention._fwd_shared_bytes(head_dim, 64 * head_dim * 2)
        assert 4 * (shared + 1024) <= 228 * 1024, head_dim


@pytest.mark.parametrize("pairs", [1, 2, 5, 12, 40])
@pytest.mark.parametrize("pair_ctas", [8, 128, 624, 768, 4096])
@pytest.mark.parametrize("fit", [0, 1, 2, 3, 7, 100])
@pytest.mark.parametrize("most_streams", [1, 2, 3])
def test_ds_schedule_stays_within_the_budget(pairs, pair_ctas, fit, most_streams, monkeypatch):
    """Chunks cover whole pairs, the blocks of the chunks in flight fit the budget, several chunks
    always run at least two at a time (never one after another), chunks reach the minimum CTA
    count where pairs and budget allow, and the room for chunks in flight is used; otherwise
    no workspace: when a pair exceeds the budget or two chunks cannot be in flight."""
    monkeypatch.setattr(cuda_attention, "_DS_STREAMS", most_streams)
    monkeypatch.setattr(cuda_attention, "_DS_MIN_BYTES", 0)
    pair_bytes = 484 << 20
    budget = fit * pair_bytes + pair_bytes // 2
    chunk, streams = cuda_attention.ds_schedule(pairs, pair_bytes, pair_ctas, budget)
    want = -(-cuda_attention._DS_MIN_CTAS // pair_ctas)
    whole = min(pairs, want) if most_streams == 1 or fit >= 2 * min(pairs, want) else None
    if fit == 0 or (pairs > min(fit, want) and (fit < 2 or most_streams == 1)):
        assert (chunk, streams) == (0, 0)
        return
    chunks = -(-pairs // chunk)
    assert 1 <= chunk <= min(pairs, want) and streams * chunk * pair_bytes <= budget
    assert streams == min(most_streams, chunks, fit // chunk)
    assert chunks == 1 or streams >= 2
    if whole is not None:
        assert chunk == whole


def test_ds_schedule_at_the_benchmark_shapes():
    """The default 2 GiB: three heads in flight at 12 x 49152 tokens (77 of 768 tiles) and at
    Wan2.1 480p (78 of 624); 1 GiB: two; a head's blocks alone: recompute, not one after another."""
    block = 64 * 64 * 2
    main, p480 = 768 * 77 * block, 624 * 78 * block
    assert cuda_attention.ds_schedule(12, main, 768, 2 << 30) == (1, 3)
    assert cuda_attention.ds_schedule(12, p480, 624, 2 << 30) == (1, 3)
    assert cuda_attention.ds_schedule(12, main, 768, 1 << 30) == (1, 2)
    assert cuda_attention.ds_schedule(12, main, 768, main) == (0, 0)
    assert cuda_attention.ds_schedule(12, main, 768, 0) == (0, 0)
    assert cuda_attention.ds_schedule(12, main, 768, 12 * main) == (1, 3)


def test_ds_schedule_leaves_small_problems_to_recompute():
    """Below _DS_MIN_BYTES of dS blocks in all the dQ pass recomputes dS, at any budget."""
    least = cuda_attention._DS_MIN_BYTES
    assert cuda_attention.ds_schedule(12, -(-least // 12), 128, 1 << 40) != (0, 0)
    assert cuda_attention.ds_schedule(12, least // 12, 128, 1 << 40) == (0, 0)  # 12 x that is just below
    assert cuda_attention.ds_schedule(12, 128 * 16 * 8192, 128, 1 << 40) == (0, 0)  # (8, 32, 32), top 16: slower


def test_ds_schedule_honours_the_pair_cap(monkeypatch):
    monkeypatch.setattr(cuda_attention, "_DS_CHUNK_PAIRS", 1)
    monkeypatch.setattr(cuda_attention, "_DS_MIN_BYTES", 0)
    assert cuda_attention.ds_schedule(6, 1 << 20, 8, 1 << 30) == (1, cuda_attention._DS_STREAMS)
    assert cuda_attention.ds_schedule(1, 1 << 20, 8, 1 << 30) == (1, 1)


def test_ds_parts_at_wan_14b_720p():
    """Wan2.1-14B 720p (1440 tiles, top 180, 40 heads): one head's blocks (1.98 GiB) do not fit the
    default 2 GiB twice, so ds_schedule recomputes; ds_parts takes two streams of two parts each
    (three streams would need four).  Twice the budget: whole heads on two streams again."""
    entries, block = 1440 * 180, 64 * 64 * 2
    assert cuda_attention.ds_schedule(40, entries * block, 1440, 2 << 30) == (0, 0)
    assert cuda_attention.ds_parts(40, entries, 1440, block, 2 << 30) == (2, entries // 2)
    assert cuda_attention.ds_schedule(40, entries * block, 1440, 4 << 30) == (1, 2)


@pytest.mark.parametrize("pairs", [1, 2, 40])
@pytest.mark.parametrize("pair_entries, list_entries", [(420, 60), (259200, 1440), (1000, 1000), (5, 64)])
@pytest.mark.parametrize("entries_per_stream", [0, 50, 100, 200, 700, 3000])
@pytest.mark.parametrize("most_streams", [1, 2, 3])
def test_ds_parts_stay_within_the_budget(pairs, pair_entries, list_entries, entries_per_stream, most_streams,
                                         monkeypatch):
    """Parts cover every entry of a pair (parts x cap >= its entries), each stream's blocks (cap +
    a list's entries, or the whole pair if less) fit the budget, two to _DS_STREAMS streams run
    at a time, at most _DS_MAX_PARTS parts, and no fewer parts fit; else (0, 0)."""
    monkeypatch.setattr(cuda_attention, "_DS_STREAMS", most_streams)
    monkeypatch.setattr(cuda_attention, "_DS_MIN_BYTES", 0)
    entry = 3 * 8192
    budget = 3 * entries_per_stream * entry
    streams, cap = cuda_attention.ds_parts(pairs, pair_entries, list_entries, entry, budget)

    def fewest(s):  # the fewest parts with s streams, or None
        most = budget // (s * entry) - list_entries
        if most < max(1, list_entries):
            return None
        parts = -(-pair_entries // most)
        return parts if parts <= cuda_attention._DS_MAX_PARTS else None

    options = [(fewest(s), -s) for s in range(2, min(most_streams, pairs) + 1) if fewest(s)]
    if pairs < 2 or not options or min(options)[0] < 2:
        assert (streams, cap) == (0, 0)
        return
    parts = -(-pair_entries // cap)
    assert 2 <= streams <= min(most_streams, pairs) and 2 <= parts <= cuda_attention._DS_MAX_PARTS
    assert parts * cap >= pair_entries
    assert streams * min(pair_entries, cap + list_entries) * entry <= budget
    assert (parts, -streams) == min(options)


def test_size_limits_are_refused_before_any_launch():
    """(batch, head) pairs beyond a launch's grid y, and more selection entries than the
    backward's int32 list offsets hold (an 84 x 45 x 80 latent, 40 heads, B = 8, topk 1332 of
    5040), raise a ValueError that says so; one pair fewer, or one entry, passes."""
    def q_like(b, h):  # what check_kernel_support reads of an array: address, dtype, shape
        return SimpleNamespace(data=SimpleNamespace(ptr=0), dtype=np.float16, shape=(b, h, 64, 64))

    with pytest.raises(ValueError, match=r"at most 65535 \(batch, head\) pairs, got 2 x 32768; split the batch"):
        cuda_attention.check_kernel_support(q_like(2, 32768), 64)
    assert cuda_attention.check_kernel_support(q_like(3, 21845), 64) == "__half"
    with pytest.raises(ValueError, match=r"q2k_idx: expected at most \d+ selection entries for the CUDA backward"):
        cuda_attention.check_backward_lists((8, 40, 5040, 1332))
    cuda_attention.check_backward_lists((8, 40, 5040, 1331))
