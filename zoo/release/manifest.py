"""The records a build writes: stages/<stage>.json (`StageRecord`) and release.json (`ReleaseManifest`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mla_zoo.modeling.convert_schema import ConversionReport, ConvertSettings, KVCacheSize
from mla_zoo.modeling.schema import Report
from mla_zoo.zoo.evaluate import EvalComparison

from .gates import GateResult


@dataclass
class FileHash:
    sha256: str
    size: int


@dataclass
class StageRecord(Report):
    """stages/<stage>.json: what a stage ran on and what it made."""

    stage: str
    input_hash: str
    inputs: dict[str, Any]
    outputs: dict[str, FileHash]  # path in the stage's directory -> hash
    result: dict[str, Any]  # the stage's JSON result
    seconds: float
    finished_at: str


@dataclass
class RecipeCopy:
    name: str
    file: str
    sha256: str
    text: str
    data: dict[str, Any]


@dataclass
class StageStamp:
    input_hash: str
    seconds: float


@dataclass
class ReleaseManifest(Report):
    """release.json: a built release (recipe, versions, sha256 of every file, metrics, gates)."""

    FILE = "release.json"
    SCHEMA_VERSION = 2

    name: str
    repo_id: str
    version: str
    tag: str
    description: str | None
    license: str
    base_model: str | None
    recipe: RecipeCopy
    versions: dict[str, str]
    stages: dict[str, StageStamp | None]  # None: disabled
    kv_cache: KVCacheSize
    settings: ConvertSettings
    metrics: EvalComparison
    gates: list[GateResult]
    files: dict[str, FileHash]  # every file of the Hub repo but release.json itself
    built_at: str

    @classmethod
    def upgrade(cls, data: dict, version: int) -> dict:
        """Version 1 had "format": 1 and the conversion settings with the rank twice."""
        settings = ConversionReport.upgrade({"settings": data["settings"]}, 1)["settings"]
        return {**{k: v for k, v in data.items() if k != "format"}, "settings": settings}
