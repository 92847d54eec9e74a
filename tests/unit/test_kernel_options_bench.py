"""The arithmetic count behind docs/BENCHMARKS.md's bound on the joint attention's warm-up."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import ml1m_config
from benchmarks.kernel_options import joint_warmup_macs, matmul_gflops
from emerg_stream.model.interaction import JointAttention


def test_the_forward_count_is_what_torch_counts_for_the_joint_attention():
    cfg = ml1m_config("joint")
    att = JointAttention(cfg.n_fields, cfg.dim, cfg.heads, cfg.head_dim)
    h = torch.randn(1, cfg.layers + 1, cfg.n_fields, cfg.dim)
    with FlopCounterMode(display=False) as counter:
        att(h)
    assert joint_warmup_macs(cfg)["forward"] * 2 == counter.get_total_flops()


def test_the_ml1m_shape_count_and_a_positive_matmul_rate():
    parts = joint_warmup_macs(ml1m_config("joint"))
    assert sum(parts.values()) == 952_992  # docs/BENCHMARKS.md, ninth round
    assert parts["backward"] < 2 * parts["forward"]
    assert matmul_gflops(128, reps=2) > 0
