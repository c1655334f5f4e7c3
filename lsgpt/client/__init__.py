"""Client of the served GPT-2 models (gRPC via tritonclient; imports no torch). See lsgpt/client/api.py."""

from lsgpt.client.api import (  # noqa: F401
    DEFAULT_TOKENIZER,
    Client,
    ClientError,
    InvalidRequest,
    ModelNotReady,
    RequestTimeout,
    ServerBusy,
    ServerUnavailable,
    check_sampling,
)
