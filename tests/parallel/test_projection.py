"""The all-to-all closed form and the cluster projection against cases worked by hand."""

from __future__ import annotations

import pytest

from moekit.parallel.projection import (
    DEEPSEEK_V3, Cluster, all_to_all_bytes, bytes_per_row, project, rows_per_token,
)


def test_one_rank_sends_nothing_and_two_ranks_send_half_the_slots():
    assert all_to_all_bytes(top_k=8, ep=1, d_model=7168, bytes_per_element=2) == 0
    assert all_to_all_bytes(top_k=2, ep=2, d_model=4, bytes_per_element=4) == 2 * 0.5 * 4 * 4
    assert all_to_all_bytes(top_k=8, ep=256, d_model=7168, bytes_per_element=2) == pytest.approx(8 * 255 / 256 * 14336)
    with pytest.raises(ValueError, match="ep=0"):
        all_to_all_bytes(top_k=2, ep=0, d_model=4, bytes_per_element=4)


def test_fp8_rows_carry_one_fp32_scale_per_128_values():
    assert bytes_per_row(7168, "bf16") == 14336
    assert bytes_per_row(7168, "fp8") == 7168 + 4 * 56
    assert bytes_per_row(100, "fp8") == 100 + 4  # a partial tile still has its scale
    with pytest.raises(ValueError, match="unknown row dtype 'int4'"):
        bytes_per_row(16, "int4")


def test_plain_all_to_all_splits_the_leaving_slots_between_infiniband_and_nvlink():
    ib, nvl = rows_per_token(top_k=8, ep=256, gpus_per_node=8)
    assert ib == pytest.approx(8 * 248 / 256) and nvl == pytest.approx(8 * 7 / 256)
    assert ib + nvl == pytest.approx(8 * (1 - 1 / 256))  # eq. (1)'s rows
    assert rows_per_token(top_k=2, ep=4, gpus_per_node=8) == (0.0, 2 * 3 / 4)  # one node: no InfiniBand
    with pytest.raises(ValueError, match="ep=12 must be whole nodes of gpus_per_node=8"):
        rows_per_token(top_k=2, ep=12, gpus_per_node=8)


def test_node_limited_routing_sends_a_token_once_per_remote_node():
    assert rows_per_token(top_k=8, ep=64, gpus_per_node=8, node_limit=4) == (4 * (1 - 1 / 8), 8 * 7 / 8)
    assert rows_per_token(top_k=8, ep=256, gpus_per_node=8, node_limit=4)[0] == 4 * 31 / 32
    assert rows_per_token(top_k=8, ep=16, gpus_per_node=8, node_limit=4)[0] == 2 * 0.5  # only 2 nodes to reach
    assert rows_per_token(top_k=8, ep=8, gpus_per_node=8, node_limit=4)[0] == 0


def test_deepseek_v3_projection_by_hand():
    cluster = Cluster()
    p = project(DEEPSEEK_V3, cluster, ep=64, tokens_per_gpu=4096, dispatch_dtype="fp8", node_limit=4)
    row = (7168 + 224) + 14336  # FP8 dispatch + BF16 combine
    assert p.ib_bytes_per_token == pytest.approx(3.5 * row)
    assert p.layer_ib_s == pytest.approx(4096 * 3.5 * row / 50e9)
    assert p.layer_nvlink_s == pytest.approx(4096 * 7 * row / 160e9)
    flops = 2 * 3 * 7168 * 2048 * 9 * 4096  # 8 routed + 1 shared SwiGLU experts per token
    assert p.layer_expert_s == pytest.approx(flops / (989e12 * 0.4))
    assert p.step_bytes == pytest.approx(2 * 58 * 4096 * 3.5 * row)
    assert p.step_comm_s == pytest.approx(2 * 58 * p.layer_ib_s)  # InfiniBand is the slower link here
    assert p.step_expert_s == pytest.approx(3 * 58 * p.layer_expert_s)
    assert p.comm_to_compute == pytest.approx(2 * p.layer_ib_s / (3 * p.layer_expert_s))
    # Without the node limit nearly every slot crosses InfiniBand: 8 * 56/64 rows instead of 3.5.
    plain = project(DEEPSEEK_V3, cluster, ep=64, tokens_per_gpu=4096, dispatch_dtype="fp8")
    assert plain.ib_rows == pytest.approx(7) and plain.layer_ib_s == pytest.approx(p.layer_ib_s * 2)
