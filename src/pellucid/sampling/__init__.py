"""Sampling: the request's controls (SamplingParams), the processors and sampler that apply
them to logits, structured-output constraints, and explain_next_token."""

from pellucid.sampling.params import SamplingParams, build_params

__all__ = ["SamplingParams", "build_params"]
