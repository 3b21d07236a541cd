"""Request bodies -> the queries the model answers, or an ApiError naming the field at fault.

Hand-written rather than a pydantic model per endpoint: every refusal says, in words, which field is
wrong and what the server takes instead (a union type's validation errors name its members, not the field).
Fields of the OpenAI API that this server does not use (``user``, ``top_p``...) are ignored; the ones that
would change the answer and that it cannot honour (``temperature`` > 0, ``n`` > 1, ``stream``) are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from megedit.serve.errors import ApiError
from megedit.serve.options import ServeOptions

PromptKind = Literal["completion", "question"]
MAX_PAGE = 1000  # edits per GET /v1/edits page


@dataclass(frozen=True)
class Query:
    """One prompt to answer: the raw text (what the router embeds), the model template it is asked through
    and how many tokens it may get."""

    text: str
    kind: PromptKind
    max_tokens: int


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not a number of tokens


def _is_number(value: Any) -> bool:
    return _is_int(value) or isinstance(value, float)


def require_object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise ApiError(f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def _check_text(text: Any, param: str, options: ServeOptions) -> str:
    if not isinstance(text, str):
        raise ApiError(f"{param} must be a string, got {type(text).__name__}", param)
    if not text.strip():
        raise ApiError(f"{param} is empty", param)
    if len(text) > options.max_prompt_chars:
        raise ApiError(f"{param} has {len(text)} characters; this server takes at most {options.max_prompt_chars}",
                       param)
    return text


def _max_tokens(body: dict, options: ServeOptions) -> int:
    # max_completion_tokens is the newer name of the same field in the chat API.
    param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    value = body.get(param)
    if value is None:
        return options.default_max_tokens
    if not _is_int(value):
        raise ApiError(f"{param} must be an integer, got {type(value).__name__}", param)
    if not 1 <= value <= options.max_tokens_limit:
        raise ApiError(f"{param} must be between 1 and {options.max_tokens_limit}, got {value}", param)
    return value


def _check_sampling(body: dict) -> None:
    """Only greedy decoding, one choice per prompt, whole responses."""
    temperature = body.get("temperature")
    if temperature is not None and (not _is_number(temperature) or temperature != 0):
        raise ApiError(f"temperature must be 0: the server decodes greedily (got {temperature!r})", "temperature")
    n = body.get("n")
    if n is not None and (not _is_int(n) or n != 1):
        raise ApiError(f"n must be 1: greedy decoding gives one answer per prompt (got {n!r})", "n")
    stream = body.get("stream")
    if stream not in (None, False):
        raise ApiError("stream is not supported: answers come whole", "stream")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(f"model must be a string, got {type(model).__name__}", "model")


def parse_completion(body: Any, options: ServeOptions) -> list[Query]:
    """POST /v1/completions: ``prompt`` (a string or a list of strings), asked through the completion template."""
    body = require_object(body)
    _check_sampling(body)
    if "prompt" not in body:
        raise ApiError("prompt is required", "prompt")
    prompt = body["prompt"]
    if isinstance(prompt, list):
        if not prompt:
            raise ApiError("prompt is an empty list", "prompt")
        if len(prompt) > options.max_batch:
            raise ApiError(f"prompt has {len(prompt)} strings; this server takes at most {options.max_batch} "
                           "per request", "prompt")
        texts = [_check_text(p, f"prompt[{i}]", options) for i, p in enumerate(prompt)]
    elif isinstance(prompt, str):
        texts = [_check_text(prompt, "prompt", options)]
    else:
        raise ApiError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}", "prompt")
    max_tokens = _max_tokens(body, options)
    return [Query(text, "completion", max_tokens) for text in texts]


def _message(message: Any, i: int) -> tuple[str, str]:
    """(role, content) of one chat message; content may be a string or a list of text parts."""
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise ApiError(f"{where} must be an object with role and content, got {type(message).__name__}", where)
    role = message.get("role")
    if not isinstance(role, str):
        raise ApiError(f"{where}.role must be a string", f"{where}.role")
    content = message.get("content")
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...], the API's multi-part form
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise ApiError(f"{where}.content: only text parts ({{type: text, text}}) are supported", f"{where}.content")
        content = "".join(p["text"] for p in content)
    if content is None and role != "user":  # an assistant turn with tool calls only has no content
        content = ""
    if not isinstance(content, str):
        raise ApiError(f"{where}.content must be a string, got {type(content).__name__}", f"{where}.content")
    return role, content


def parse_chat(body: Any, options: ServeOptions) -> list[Query]:
    """POST /v1/chat/completions: the last user message of ``messages``, asked through the question template.

    Earlier turns only need to be well-formed: the edited model answers one question, not a conversation."""
    body = require_object(body)
    _check_sampling(body)
    if "messages" not in body:
        raise ApiError("messages is required", "messages")
    messages = body["messages"]
    if not isinstance(messages, list) or not messages:
        raise ApiError("messages must be a non-empty list of {role, content} objects", "messages")
    parsed = [_message(m, i) for i, m in enumerate(messages)]
    users = [i for i, (role, _) in enumerate(parsed) if role == "user"]
    if not users:
        raise ApiError("messages has no user message to answer", "messages")
    last = users[-1]
    text = _check_text(parsed[last][1], f"messages[{last}].content", options)
    return [Query(text, "question", _max_tokens(body, options))]


def _query_int(raw: str | None, param: str, default: int, low: int, high: int | None) -> int:
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(f"{param} must be an integer, got {raw!r}", param) from None
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ApiError(f"{param} must be {bound}, got {value}", param)
    return value


def parse_page(offset: str | None, limit: str | None) -> tuple[int, int]:
    """GET /v1/edits?offset=&limit=: (offset, limit), offset >= 0 and 1 <= limit <= MAX_PAGE (default 100)."""
    return _query_int(offset, "offset", 0, 0, None), _query_int(limit, "limit", 100, 1, MAX_PAGE)


def parse_reload(body: Any) -> str | None:
    """POST /admin/reload: an optional ``run`` (a run folder); none reloads the run being served."""
    if body is None:
        return None
    run = require_object(body).get("run")
    if run is not None and (not isinstance(run, str) or not run.strip()):
        raise ApiError("run must be the path of a run folder (a non-empty string)", "run")
    return run
