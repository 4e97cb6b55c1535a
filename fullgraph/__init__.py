"""fullgraph: an LLM inference engine in which every model step runs as one full CUDA graph."""
from fullgraph.logger import configure_logging
from fullgraph.outputs import CompletionOutput, Logprob, RequestOutput
from fullgraph.sampling_params import SamplingParams

__version__ = "0.1.0"

configure_logging()


def __getattr__(name):
    # LLM pulls in the whole engine; import it lazily so `import fullgraph` stays light.
    if name == "LLM":
        from fullgraph.entrypoints.llm import LLM
        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob"]
