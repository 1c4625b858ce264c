"""Test support: a reusable multi-rank gloo launcher, the dense oracle, the torch_npu emulation."""

from usp_npu.testing.launcher import ProcessGroupPool, RankFailure
from usp_npu.testing.reference import dense_attention

__all__ = ["ProcessGroupPool", "RankFailure", "dense_attention"]
