"""rlhf_ext."""
