"""SARIF 2.1.0 logs, shared by ``tierbox lint`` and ``tierbox image scan``.

Written here because the maintained SARIF packages on PyPI are object models
without a writer for this small subset; the tests validate every log against
the OASIS schema.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SCHEMA_URI = (
    "https://docs.oasis-open.org/sarif/sarif/v2.1.0/errata01/os/schemas/sarif-schema-2.1.0.json"
)


@dataclass(frozen=True)
class SarifRule:
    id: str
    name: str
    short: str
    help_text: str = ""
    help_uri: str = ""
    level: str = "warning"  # error | warning | note | none
    properties: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "name": self.name,
            "shortDescription": {"text": self.short},
            "defaultConfiguration": {"level": self.level},
        }
        if self.help_text:
            out["help"] = {"text": self.help_text}
        if self.help_uri:
            out["helpUri"] = self.help_uri
        if self.properties:
            out["properties"] = self.properties
        return out


@dataclass(frozen=True)
class SarifResult:
    rule_id: str
    level: str
    message: str
    uri: str
    line: int = 0  # 0: no line (the whole artifact)
    properties: dict[str, Any] = field(default_factory=dict)


def sarif_log(
    tool_name: str,
    version: str,
    rules: list[SarifRule],
    results: list[SarifResult],
    *,
    run_properties: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One run of ``tool_name`` with its rules and results."""
    index = {r.id: i for i, r in enumerate(rules)}
    out_results = []
    for res in results:
        location: dict[str, Any] = {"artifactLocation": {"uri": res.uri}}
        if res.line > 0:
            location["region"] = {"startLine": res.line}
        item: dict[str, Any] = {
            "ruleId": res.rule_id,
            "level": res.level,
            "message": {"text": res.message},
            "locations": [{"physicalLocation": location}],
        }
        if res.rule_id in index:
            item["ruleIndex"] = index[res.rule_id]
        if res.properties:
            item["properties"] = res.properties
        out_results.append(item)
    driver: dict[str, Any] = {"name": tool_name, "rules": [r.to_dict() for r in rules]}
    if version:
        driver["version"] = version
    run: dict[str, Any] = {"tool": {"driver": driver}, "results": out_results}
    if run_properties:
        run["properties"] = run_properties
    return {"$schema": SCHEMA_URI, "version": "2.1.0", "runs": [run]}
