"""Speculative decoding: verification rules (:mod:`.sampling`) and TriForce (:mod:`.triforce`)."""
from longctx.speculative.sampling import (
    commit_uniform,
    greedy_verify,
    logits_to_probs,
    residual,
    sample,
    speculative_verify,
    warp_logits,
)
from longctx.speculative.triforce import TriForceStats, check_pair, triforce_decoding, triforce_generate

__all__ = [
    "triforce_generate",
    "triforce_decoding",
    "TriForceStats",
    "check_pair",
    "greedy_verify",
    "speculative_verify",
    "commit_uniform",
    "logits_to_probs",
    "warp_logits",
    "residual",
    "sample",
]
