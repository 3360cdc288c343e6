"""The `[source]` of a recipe: what it names (`SourceSettings`), what kind of source that is, and,
for a build, its content identity, a local path to load it from and its license (`RecipeSource`)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from mla_zoo.modeling import sources
from mla_zoo.modeling.common import BuildError, HubError, SettingsError, hash_json, hash_tree, sha256_file
from mla_zoo.modeling.hub_client import hub_call
from mla_zoo.modeling.schema import Settings, setting

REPO_ID = sources.HUB_ID


def resolve_path(raw: str, base_dir: Path) -> Path:
    """A path as a recipe writes it: relative to the recipe file's directory; `~` and absolute work too."""
    path = Path(raw).expanduser()
    return path if path.is_absolute() else (base_dir / path).resolve()


@dataclass
class SourceSettings(Settings):
    model: str = setting(help="a bundled name, a Hub id ORG/NAME, a local checkpoint dir or a .gguf file")
    revision: str | None = setting(None, help="Hub sources: a branch, tag or commit")


@dataclass(frozen=True)
class RecipeSource:
    """A recipe's source, located: kind is bundled | gguf | local | hub."""

    model: str  # as written in the recipe
    kind: str
    path: Path | None = None  # gguf and local: resolved
    revision: str | None = None  # hub only

    @classmethod
    def locate(cls, s: SourceSettings, base_dir: Path) -> RecipeSource:
        local = resolve_path(s.model, base_dir)
        if s.model in sources.BUNDLED:
            kind, path = "bundled", None
        elif s.model.endswith(".gguf"):
            if not local.is_file():
                raise SettingsError(f"`model` names a .gguf file that does not exist: {local}")
            kind, path = "gguf", local
        elif s.model.startswith((".", "/", "~")) or local.exists():
            if not (local / "config.json").is_file():
                raise SettingsError(f"`model` names a local checkpoint dir without config.json: {local} "
                                    "(relative paths are relative to the recipe file's directory)")
            kind, path = "local", local
        elif re.fullmatch(REPO_ID, s.model):
            kind, path = "hub", None
        else:
            raise SettingsError(f"`model` must be a bundled name ({', '.join(sources.BUNDLED)}), a Hub id ORG/NAME, "
                                f"a local checkpoint dir or a .gguf file (got {s.model!r})")
        if s.revision is not None and kind != "hub":
            raise SettingsError(f"`revision` applies to Hub sources only; {s.model!r} is a {kind} source")
        return cls(s.model, kind, path, s.revision)

    def identity(self, log=print) -> dict:
        """What identifies the source's content now (input hashes of the convert and eval stages)."""
        if self.kind == "bundled":
            return {"bundled": self.model, "sha256": sha256_file(sources.bundled_gguf(self.model))}
        if self.kind == "gguf":
            return {"gguf": self.path.name, "sha256": sha256_file(self.path)}
        if self.kind == "local":
            return {"local": hash_json(hash_tree(self.path))}
        return {"hub": self.model, "revision": self.revision, "commit": self._hub_commit(log)}

    def _hub_commit(self, log) -> str | None:
        """The commit a Hub source's revision points at now (None when the Hub cannot be asked)."""
        from huggingface_hub import HfApi

        try:
            with hub_call(f"resolving {self.model}@{self.revision or 'main'}", browse=True):
                return HfApi().model_info(self.model, revision=self.revision).sha
        except HubError as e:  # offline: the revision string (and the local cache) is all there is
            log(f"note: {e}; hashing the revision name instead")
            return None

    def local(self, commit: str | None) -> str:
        """What `sources.resolve` and `evaluate` load: a bundled name or a local path (a Hub source is
        downloaded at `commit`, else at its revision)."""
        if self.kind == "bundled":
            return self.model
        if self.kind in ("gguf", "local"):
            return str(self.path)
        revision = commit or self.revision
        try:
            return str(sources.download_hub_source(self.model, revision))
        except HubError as e:
            raise BuildError(f"cannot download the source: {e}") from e

    def license(self, commit: str | None) -> str | None:
        """The license in the source's model card (Hub metadata at `commit`, or a local dir's README.md)."""
        if self.kind == "hub":
            from huggingface_hub import HfApi

            try:
                with hub_call(f"reading the card of {self.model}", browse=True):
                    card = HfApi().model_info(self.model, revision=commit or self.revision).card_data
            except HubError:
                return None
            return card.license if card is not None else None
        if self.kind == "local" and (self.path / "README.md").is_file():
            from huggingface_hub import ModelCard

            try:
                return ModelCard.load(self.path / "README.md").data.license
            except Exception:
                return None
        return None

    def published_path(self) -> str:
        """How reports name the source: as the recipe writes it (no local directories)."""
        return self.model if self.kind != "hub" else f"{self.model}@{self.revision or 'main'}"
