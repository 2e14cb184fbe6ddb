"""The API's error ``code`` field: one code per error class of
:mod:`tierbox.errors`, both ways, and the HTTP status each one answers with.

A code is the class name in snake case without ``Error``
(``SandboxNotFoundError`` -> ``sandbox_not_found``; the root is ``tierbox``),
so a client turns a code back into the very class the daemon raised.
"""

from __future__ import annotations

import re

from tierbox import errors

#: HTTP status by error class; a class not listed takes its nearest base's.
_STATUS: dict[type[errors.TierboxError], int] = {
    errors.TierboxError: 500,
    errors.UsageError: 400,
    errors.SpecError: 422,
    errors.UnknownTierError: 422,
    errors.UnsupportedImageError: 422,
    errors.InvalidRequestError: 422,
    errors.ImageNotFoundError: 404,
    errors.SandboxNotFoundError: 404,
    errors.ExecNotFoundError: 404,
    errors.SnapshotNotFoundError: 404,
    errors.VMNotFoundError: 404,
    errors.PoolNotFoundError: 404,
    errors.SandboxClosedError: 409,
    errors.SandboxDeadError: 409,
    errors.SandboxError: 409,
    errors.SnapshotExistsError: 409,
    errors.VMExistsError: 409,
    errors.PoolExistsError: 409,
    errors.WaitTimeoutError: 408,
    errors.NotSupportedError: 400,
    errors.SandboxFileError: 400,
    errors.NotRegularFileError: 400,
    errors.FileTooLargeError: 413,
    errors.AuthenticationError: 401,
    errors.PermissionDeniedError: 403,
    errors.QuotaExceededError: 429,
    errors.TierUnavailableError: 503,
    errors.ShuttingDownError: 503,
    errors.ServerUnreachableError: 503,
    errors.ServerError: 500,
}


def code_of(cls: type[BaseException]) -> str:
    """``SandboxNotFoundError`` -> ``sandbox_not_found``."""
    name = cls.__name__.removesuffix("Error") or cls.__name__
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


def _classes() -> dict[str, type[errors.TierboxError]]:
    found: dict[str, type[errors.TierboxError]] = {}
    for value in vars(errors).values():
        if isinstance(value, type) and issubclass(value, errors.TierboxError):
            found[code_of(value)] = value
    return found


#: code -> class, for every error class tierbox has
CLASSES: dict[str, type[errors.TierboxError]] = _classes()


def status_of(cls: type[BaseException]) -> int:
    """The HTTP status an error class answers with (its nearest listed base's)."""
    for base in cls.__mro__:
        if base in _STATUS:
            return _STATUS[base]
    return 500


def error_body(exc: errors.TierboxError) -> dict[str, object]:
    """The JSON an error answers with: ``code``, ``message`` and, where the
    class carries them, ``field``, ``quota`` and ``path``."""
    body: dict[str, object] = {"code": code_of(type(exc)), "message": str(exc)}
    for attr in ("field", "quota", "path"):
        value = getattr(exc, attr, None)
        if value:
            body[attr] = value
    return body


def error_from(status: int, body: object) -> errors.TierboxError:
    """The exception a client raises for an error answer: the class named by
    its ``code``; an answer without one (a proxy, a crash) by its status."""
    code = message = None
    extra: dict[str, str] = {}
    if isinstance(body, dict):
        code = body.get("code")
        message = body.get("message")
        extra = {k: str(body[k]) for k in ("field", "quota", "path") if body.get(k)}
    text = str(message) if message else f"the daemon answered HTTP {status}"
    cls = CLASSES.get(code) if isinstance(code, str) else None
    if cls is None:
        cls = {401: errors.AuthenticationError, 404: errors.SandboxNotFoundError}.get(
            status, errors.ServerError
        )
    if cls is errors.InvalidRequestError:
        return errors.InvalidRequestError(text, field=extra.get("field", ""))
    if cls is errors.QuotaExceededError:
        return errors.QuotaExceededError(text, quota=extra.get("quota", ""))
    if issubclass(cls, errors.SandboxFileError):
        return cls(text, path=extra.get("path", ""))
    try:
        exc = cls(text)
    except TypeError:  # a class whose constructor wants more (CommandError, AgentError)
        exc = errors.ServerError(f"{code}: {text}")
    if "field" in extra:
        exc.field = extra["field"]  # type: ignore[attr-defined]
    return exc
