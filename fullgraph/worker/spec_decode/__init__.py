"""Speculative decoding: verifying a drafter's tokens against the target (rejection.py), the
EAGLE drafter's side of a step (proposer.py), the host bookkeeping of a step (verify.py), the
sampler's logits processing on the scored rows (processing.py) and how a step runs
(steps.py); the model runner drives them (docs/speculative.md).
"""
from fullgraph.worker.spec_decode.rejection import (ACCEPT_STREAM, DRAFT_STREAM,
                                                    RejectionOutput, accept_uniforms,
                                                    draft_gumbel_noise, rejection_sample,
                                                    residual_distribution, stream_seeds,
                                                    target_probs)

__all__ = ["ACCEPT_STREAM", "DRAFT_STREAM", "RejectionOutput", "accept_uniforms",
           "draft_gumbel_noise", "rejection_sample", "residual_distribution", "stream_seeds",
           "target_probs"]
