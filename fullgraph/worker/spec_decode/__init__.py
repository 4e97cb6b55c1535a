"""Speculative decoding: verifying a drafter's tokens against the target (rejection.py).

docs/speculative.md describes the drafters (models/eagle.py) and how the engine is to run
them; nothing in the engine calls this package yet.
"""
from fullgraph.worker.spec_decode.rejection import (ACCEPT_STREAM, DRAFT_STREAM,
                                                    RejectionOutput, accept_uniforms,
                                                    draft_gumbel_noise, rejection_sample,
                                                    residual_distribution, stream_seeds,
                                                    target_probs)

__all__ = ["ACCEPT_STREAM", "DRAFT_STREAM", "RejectionOutput", "accept_uniforms",
           "draft_gumbel_noise", "rejection_sample", "residual_distribution", "stream_seeds",
           "target_probs"]
