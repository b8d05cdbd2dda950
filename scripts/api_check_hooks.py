"""Checks of the admin API that schemathesis' own do not make (loaded by scripts/api-check).

Every 4xx and 5xx answer carries the error envelope the OpenAPI document describes:
`{"error": {"code": "<snake_case kind>", "message": "<what was wrong and what to do>"}}`, as
`application/json`, with the code among those the document lists.
"""

import json

import schemathesis


def _error_codes(case):
    """The error codes the document lists (`components/schemas/ErrorCode`), or None."""
    schemas = (case.operation.schema.raw_schema.get("components") or {}).get("schemas") or {}
    enum = (schemas.get("ErrorCode") or {}).get("enum")
    return set(enum) if enum else None


@schemathesis.check
def error_body_conformance(ctx, response, case):
    """A 4xx or 5xx answer is the JSON error envelope with a documented code and a message."""
    if response.status_code < 400:
        return None
    content_type = response.headers.get("content-type") or response.headers.get("Content-Type") or ""
    if isinstance(content_type, list):
        content_type = content_type[0] if content_type else ""
    if not content_type.split(";")[0].strip() == "application/json":
        raise AssertionError(f"{response.status_code} answered as {content_type!r}, not application/json")
    try:
        body = json.loads(response.content)
    except ValueError as e:
        raise AssertionError(f"{response.status_code} body is not JSON ({e}): {response.content[:200]!r}")
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict) or set(error) != {"code", "message"}:
        raise AssertionError(f"{response.status_code} body is not {{\"error\": {{code, message}}}}: {body!r}")
    code, message = error["code"], error["message"]
    if not isinstance(code, str) or not isinstance(message, str) or not message.strip():
        raise AssertionError(f"{response.status_code} error needs a string code and a message: {body!r}")
    known = _error_codes(case)
    if known is not None and code not in known:
        raise AssertionError(f"{response.status_code} error code {code!r} is not one the document lists")
    return None
