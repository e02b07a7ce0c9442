"""pellucid: an LLM inference engine you can see through."""

from pellucid.errors import PellucidError
from pellucid.sampling.params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "PellucidError", "load_model", "__version__"]


def __getattr__(name: str):
    # Heavy imports (torch) only when the API is used, so `pellucid --help` stays quick.
    if name == "LLM":
        from pellucid.api import LLM

        return LLM
    if name == "load_model":
        from pellucid.loading import load_model

        return load_model
    raise AttributeError(name)
