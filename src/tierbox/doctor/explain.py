"""``tierbox doctor --explain``: the facts of a diagnosis, secrets redacted,
sent to an OpenAI-compatible chat endpoint for a plain-language account.

The endpoint is ``TIERBOX_LLM_URL`` (a base like ``http://host:8000/v1``, or
the full ``.../chat/completions``), the model ``TIERBOX_LLM_MODEL`` and the
bearer token ``TIERBOX_LLM_KEY`` (optional). Without an endpoint nothing is
sent and doctor's own findings stand. ``--print-prompt`` shows the request
body instead of sending it. The HTTP call is urllib's: one POST with a
timeout needs no client library.
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from typing import Any

from tierbox.doctor.model import Diagnosis
from tierbox.errors import ExplainError

URL_ENV = "TIERBOX_LLM_URL"
MODEL_ENV = "TIERBOX_LLM_MODEL"
KEY_ENV = "TIERBOX_LLM_KEY"
DEFAULT_MODEL = "gpt-4o-mini"
TIMEOUT_S = 60.0
REDACTED = "<redacted>"

SYSTEM = (
    "You are tierbox doctor. You are given the facts of one workload that ended badly "
    "(a tierbox sandbox run, a Kubernetes pod, a container or a cgroup) and tierbox's own "
    "diagnosis. Explain in plain language, in at most 8 sentences, why it ended, whether "
    "the diagnosis follows from the numbers, and what to change. Quote numbers with units. "
    "Do not invent facts that are not given."
)

#: names whose values are secrets wherever they appear (env, args, annotations)
_SECRET_NAME = re.compile(
    r"(pass(word|wd)?|secret|token|api[_-]?key|access[_-]?key|private[_-]?key|credential|"
    r"auth|session|cookie|signature|dsn|conn(ection)?[_-]?string)",
    re.IGNORECASE,
)
#: values that look like credentials whatever they are called
_SECRET_VALUE = re.compile(
    r"(bearer\s+[\w.~+/-]+=*|ghp_\w{20,}|gh[ousr]_\w{20,}|xox[abpr]-[\w-]+|sk-[\w-]{16,}|"
    r"AKIA[0-9A-Z]{16}|eyJ[\w-]+\.[\w-]+\.[\w-]+|[A-Za-z0-9+/]{40,}={0,2}|[0-9a-f]{32,})",
    re.IGNORECASE,
)
_ASSIGN = re.compile(
    r"(?P<name>[\w.-]*(?:" + _SECRET_NAME.pattern + r")[\w.-]*)(?P<sep>[=:])(?P<value>\S+)",
    re.IGNORECASE,
)


def redact_text(text: str) -> str:
    """Credential-looking values and ``NAME=value`` pairs with a secret-like name."""
    text = _ASSIGN.sub(lambda m: f"{m.group('name')}{m.group('sep')}{REDACTED}", text)
    return _SECRET_VALUE.sub(REDACTED, text)


def redact(value: Any, key: str = "") -> Any:
    """A copy with secrets gone: every environment value, anything under a
    secret-like key, credential-looking strings, and kubectl's
    last-applied-configuration (a copy of the manifest, env included)."""
    if key in ("env", "environment", "Env"):
        if isinstance(value, dict):
            return {k: REDACTED for k in value}
        if isinstance(value, list):
            return [_redact_env_entry(e) for e in value]
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            applied = k == "kubectl.kubernetes.io/last-applied-configuration"
            if applied or (isinstance(v, str) and _SECRET_NAME.search(str(k))):
                out[k] = REDACTED
            else:
                out[k] = redact(v, str(k))
        return out
    if isinstance(value, list):
        return [redact(v, key) for v in value]
    if isinstance(value, str):
        return redact_text(value)
    return value


def _redact_env_entry(entry: Any) -> Any:
    if isinstance(entry, dict):  # {"name": ..., "value": ...} / valueFrom
        return {"name": entry.get("name"), "value": REDACTED}
    if isinstance(entry, str):  # docker's "NAME=value"
        return entry.split("=", 1)[0] + "=" + REDACTED
    return REDACTED


def facts_for(diagnosis: Diagnosis, raw: Any = None) -> dict[str, Any]:
    """What is sent: the diagnosis and the input it came from, redacted."""
    out: dict[str, Any] = redact({"diagnosis": diagnosis.to_dict(), "input": raw})
    return out


def request_body(diagnosis: Diagnosis, raw: Any = None, model: str | None = None) -> dict[str, Any]:
    """The chat completion request ``--explain`` sends (and ``--print-prompt`` prints)."""
    facts = facts_for(diagnosis, raw)
    return {
        "model": model or os.environ.get(MODEL_ENV) or DEFAULT_MODEL,
        "temperature": 0,
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": json.dumps(facts, indent=1, default=str)},
        ],
    }


def endpoint() -> str | None:
    url = os.environ.get(URL_ENV, "").strip()
    if not url:
        return None
    url = url.rstrip("/")
    return url if url.endswith("/chat/completions") else f"{url}/chat/completions"


def explain(body: dict[str, Any], url: str, *, key: str | None = None) -> str:
    """POST ``body`` to ``url``; the first choice's text."""
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    token = key if key is not None else os.environ.get(KEY_ENV)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
            data = json.loads(resp.read(4 << 20))
    except urllib.error.HTTPError as exc:
        detail = exc.read(2000).decode(errors="replace")
        raise ExplainError(f"{url} answered HTTP {exc.code}: {detail}") from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise ExplainError(f"cannot get an explanation from {url}: {exc}") from exc
    try:
        text = data["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError) as exc:
        raise ExplainError(f"{url} answered without choices[0].message.content") from exc
    if not isinstance(text, str):
        raise ExplainError(f"{url} answered a non-text message")
    return text.strip()
