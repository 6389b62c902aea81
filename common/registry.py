"""Model registry: a content-addressed artifact store on disk plus version entries and the live pointer in Redis.

The store is a directory (a volume in compose): `<store>/<digest>/` holds one saved detector, where the digest is
`artifact_digest(path)`. Redis holds, per version, a hash entry (artifact URI, sha256, threshold, alpha, data
sizes, gate results, parent, created time), a sorted set of all versions, the current pointer and a list of the
earlier live versions for rollback. The pointer only moves through Lua scripts that compare it with the value the
caller expects, so two writers can never silently overwrite each other.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dlsr_monitor.common.keys import Keys

if TYPE_CHECKING:
    import redis

log = logging.getLogger(__name__)
ANY = object()
"""Sentinel for `expected=`: move the pointer whatever it currently is (still atomic, no check)."""

MAX_PREVIOUS = 50
"""Longest rollback history kept in Redis."""

REJECTED_DIR = "rejected"
#: Written next to the artifacts so a registry lost with Redis can be rebuilt (`Registry.recover`): every entry
#: as a JSON line, and which version was live.
JOURNAL = "registry.jsonl"
LIVE = "LIVE.json"
"""Sub-directory of the store where candidates that failed a gate are kept for inspection."""


class RegistryError(RuntimeError):
    """A registry operation could not be done; the message says what and what to do."""


class VersionNotFoundError(RegistryError):
    """The named model version is not registered."""


class PointerConflictError(RegistryError):
    """The current pointer was not what the caller expected (someone else moved it first)."""

    def __init__(self, expected: str | None, actual: str | None) -> None:
        super().__init__(
            f"current model is {actual or 'none'}, expected {expected or 'none'}: another trainer or operator "
            "moved it first; re-read the registry and retry"
        )
        self.expected = expected
        self.actual = actual


# --------------------------------------------------------------------------------------------------------
# digest


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fallback_digest(path: Path) -> str:
    # Used only when dlsr.artifacts is not importable: sha256 over the sorted (relative path, file sha256) list.
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path).as_posix()}\t{_file_sha256(f)}\n".encode())
    return h.hexdigest()


def artifact_digest(path: str | Path) -> str:
    """Content digest of a saved detector directory (the store key and the registry's sha256).

    dlsr's digest is the sha256 of the manifest, which pins every file's sha256; `verify_artifact` checks those.
    """
    path = Path(path)
    if not path.is_dir():
        raise RegistryError(f"artifact {path} is not a directory: pass the folder written by detector.save()")
    try:
        from dlsr.artifacts import artifact_digest as dlsr_digest
    except ImportError:
        return _fallback_digest(path)
    try:
        return str(dlsr_digest(path))
    except Exception as exc:  # dlsr.exceptions.ArtifactError: no manifest
        raise RegistryError(f"artifact {path} is not a saved detector: {exc}") from exc


def verify_artifact(path: str | Path, sha256: str) -> None:
    """Raise RegistryError unless the directory's digest is `sha256` and every file matches its manifest."""
    path = Path(path)
    digest = artifact_digest(path)
    if digest != sha256:
        raise RegistryError(
            f"artifact at {path} fails its checksum (sha256 {digest[:12]}… != registered {sha256[:12]}…): "
            "it was altered or is incomplete"
        )
    try:
        from dlsr.artifacts import read_manifest
    except ImportError:
        return  # the fallback digest already covers every file's bytes
    try:
        read_manifest(path)
    except Exception as exc:  # ArtifactError: a file differs from its manifest sha256
        raise RegistryError(f"artifact at {path} fails its checksum: {exc}") from exc


# --------------------------------------------------------------------------------------------------------
# entries


def _s(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class ModelEntry:
    """One registered model version."""

    version: str
    uri: str
    sha256: str
    threshold: float
    alpha: float
    data_sizes: dict[str, int] = field(default_factory=dict)
    gates: dict[str, Any] = field(default_factory=dict)
    parent: str | None = None
    created: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    forced: dict[str, Any] | None = None  # set when an operator made it live past the model checks (--force)
    # Which guarantee the threshold holds (dlsr.calibration): "marginal" (false alarms <= alpha on average over
    # calibration sets) or "pac" (<= alpha for this calibration set with probability >= 1 - delta). Entries
    # written before these fields read as marginal with no delta.
    calibration: str = "marginal"
    delta: float | None = None

    def to_hash(self) -> dict[str, str]:
        """Redis hash fields (strings; dicts as JSON)."""
        return {
            "version": self.version,
            "uri": self.uri,
            "sha256": self.sha256,
            "threshold": repr(float(self.threshold)),
            "alpha": repr(float(self.alpha)),
            "data_sizes": json.dumps(self.data_sizes, sort_keys=True),
            "gates": json.dumps(self.gates, sort_keys=True, default=str),
            "parent": self.parent or "",
            "created": repr(float(self.created)),
            "extra": json.dumps(self.extra, sort_keys=True, default=str),
            "forced": json.dumps(self.forced, sort_keys=True) if self.forced else "",
            "calibration": self.calibration,
            "delta": "" if self.delta is None else repr(float(self.delta)),
        }

    @classmethod
    def from_hash(cls, raw: Mapping[Any, Any]) -> ModelEntry:
        """Inverse of `to_hash` (accepts bytes or str keys and values)."""
        h = {_s(k): _s(v) for k, v in raw.items()}
        return cls(
            version=h["version"] or "",
            uri=h.get("uri") or "",
            sha256=h.get("sha256") or "",
            threshold=float(h.get("threshold") or "nan"),
            alpha=float(h.get("alpha") or "nan"),
            data_sizes=json.loads(h.get("data_sizes") or "{}"),
            gates=json.loads(h.get("gates") or "{}"),
            parent=h.get("parent") or None,
            created=float(h.get("created") or 0.0),
            extra=json.loads(h.get("extra") or "{}"),
            forced=json.loads(h.get("forced") or "null"),
            calibration=h.get("calibration") or "marginal",
            delta=float(h["delta"]) if h.get("delta") else None,
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-able view (for `dlsr model list --json` and alerts)."""
        return {
            "version": self.version,
            "uri": self.uri,
            "sha256": self.sha256,
            "threshold": self.threshold,
            "alpha": self.alpha,
            "data_sizes": self.data_sizes,
            "gates": self.gates,
            "parent": self.parent,
            "created": self.created,
            "extra": self.extra,
            "forced": self.forced,
            "calibration": self.calibration,
            "delta": self.delta,
        }


def version_number(version: str) -> int:
    """Numeric part of "v12" (for sorting); -1 when it has none."""
    digits = version.lstrip("v")
    return int(digits) if digits.isdigit() else -1


# --------------------------------------------------------------------------------------------------------
# Lua: every pointer move is one atomic script

# Register a new entry under the next version number. Entries are never deleted, so ZCARD + 1 is monotone.
_REGISTER = """
local n = redis.call('ZCARD', KEYS[1]) + 1
local version = 'v' .. n
local entry = ARGV[1] .. version
while redis.call('EXISTS', entry) == 1 do
  n = n + 1
  version = 'v' .. n
  entry = ARGV[1] .. version
end
for i = 3, #ARGV, 2 do
  redis.call('HSET', entry, ARGV[i], ARGV[i + 1])
end
redis.call('HSET', entry, 'version', version)
redis.call('ZADD', KEYS[1], ARGV[2], version)
return version
"""

# KEYS: current, previous, entry(version). ARGV: version, check(0/1), expected ('' = none), max previous.
_PROMOTE = """
if redis.call('EXISTS', KEYS[3]) == 0 then return {'missing', ''} end
local cur = redis.call('GET', KEYS[1])
if not cur then cur = '' end
if ARGV[2] == '1' and cur ~= ARGV[3] then return {'conflict', cur} end
if cur == ARGV[1] then return {'same', cur} end
if cur ~= '' then
  redis.call('LPUSH', KEYS[2], cur)
  redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[4]) - 1)
end
redis.call('SET', KEYS[1], ARGV[1])
return {'ok', cur}
"""

# KEYS: current, previous. ARGV: check(0/1), expected. Pops the newest earlier version and makes it current.
_ROLLBACK = """
local cur = redis.call('GET', KEYS[1])
if not cur then cur = '' end
if ARGV[1] == '1' and cur ~= ARGV[2] then return {'conflict', cur} end
local prev = redis.call('LPOP', KEYS[2])
while prev and prev == cur do prev = redis.call('LPOP', KEYS[2]) end
if not prev then return {'empty', cur} end
redis.call('SET', KEYS[1], prev)
return {'ok', prev, cur}
"""


class Registry:
    """Artifact store + Redis registry for one deployment.

    Args:
        redis: a `redis.Redis` client (either `decode_responses` setting works).
        keys: the deployment's key layout.
        store_root: the content-addressed store directory (created if missing).
    """

    def __init__(self, redis: redis.Redis, keys: Keys, store_root: str | Path) -> None:
        self.redis = redis
        self.keys = keys
        self.store_root = Path(store_root)
        self._register = redis.register_script(_REGISTER)
        self._promote = redis.register_script(_PROMOTE)
        self._rollback = redis.register_script(_ROLLBACK)

    # ---- store ------------------------------------------------------------------------------------
    def artifact_path(self, entry_or_digest: ModelEntry | str) -> Path:
        """Where an artifact lives in this process's store (the store may be mounted at different paths)."""
        digest = entry_or_digest.sha256 if isinstance(entry_or_digest, ModelEntry) else entry_or_digest
        return self.store_root / digest

    def store_artifact(self, src: str | Path, *, move: bool = False) -> tuple[str, Path]:
        """Copy (or move) a saved detector directory into the store, atomically; returns (digest, path).

        The copy is written to a temporary sibling, its digest computed from the copy (so a source changing
        underneath cannot mislabel it), then renamed into place. Storing identical content twice is a no-op.
        """
        src = Path(src)
        if not src.is_dir():
            raise RegistryError(f"artifact {src} not found: pass the directory written by detector.save()")
        self.store_root.mkdir(parents=True, exist_ok=True)
        tmp = self.store_root / f".tmp-{uuid.uuid4().hex}"
        try:
            if move:
                shutil.move(str(src), str(tmp))
            else:
                shutil.copytree(src, tmp)
            digest = artifact_digest(tmp)
            dest = self.store_root / digest
            if dest.exists():
                shutil.rmtree(tmp)
            else:
                try:
                    os.rename(tmp, dest)
                except OSError:
                    # Another process stored the same content between our check and the rename.
                    if not dest.exists():
                        raise
                    shutil.rmtree(tmp)
            return digest, dest
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def keep_rejected(self, src: str | Path, name: str) -> Path:
        """Move a candidate that failed a gate to `<store>/rejected/<name>/` for inspection; returns the path."""
        dest = self.store_root / REJECTED_DIR / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            shutil.rmtree(dest)
        shutil.move(str(src), str(dest))
        return dest

    # ---- registry ---------------------------------------------------------------------------------
    def register(
        self,
        artifact_dir: str | Path,
        *,
        threshold: float,
        alpha: float,
        data_sizes: Mapping[str, int] | None = None,
        gates: Mapping[str, Any] | None = None,
        parent: str | None = None,
        extra: Mapping[str, Any] | None = None,
        move: bool = False,
        calibration: str = "marginal",
        delta: float | None = None,
    ) -> ModelEntry:
        """Store the artifact and add a registry entry under the next version number; does not promote.
        `calibration` / `delta`: which guarantee the threshold holds (the detector's `calibration_method`)."""
        digest, path = self.store_artifact(artifact_dir, move=move)
        created = time.time()
        draft = ModelEntry(
            version="",
            uri=path.resolve().as_uri(),
            sha256=digest,
            threshold=float(threshold),
            alpha=float(alpha),
            data_sizes=dict(data_sizes or {}),
            gates=dict(gates or {}),
            parent=parent,
            created=created,
            extra=dict(extra or {}),
            calibration=str(calibration),
            delta=None if delta is None else float(delta),
        )
        entry = self.entry(self._add_entry(draft))
        self._journal(entry)
        return entry

    def _add_entry(self, draft: ModelEntry) -> str:
        """Write `draft` under the next version number (one atomic script); returns that version."""
        fields = draft.to_hash()
        fields.pop("version")
        argv: list[str] = [self.keys.model_entry(""), repr(draft.created)]
        for k, v in fields.items():
            argv += [k, v]
        return str(_s(self._register(keys=[self.keys.model_versions()], args=argv)))

    # ---- what survives a Redis that lost its state ------------------------------------------------------
    def _journal(self, entry: ModelEntry) -> None:
        line = json.dumps(entry.as_dict(), sort_keys=True, default=str) + "\n"
        try:
            with open(self.store_root / JOURNAL, "a", encoding="utf-8") as f:
                f.write(line)  # one write of one line: appends from several trainers do not interleave
        except OSError as exc:  # the registry itself is in Redis; the journal only helps recovery
            log.warning("cannot append to the registry journal: %s", exc)

    def _mark_live(self, entry: ModelEntry) -> None:
        tmp = self.store_root / f".{LIVE}.{uuid.uuid4().hex}"
        try:
            tmp.write_text(json.dumps({"version": entry.version, "sha256": entry.sha256, "at": time.time()}))
            os.replace(tmp, self.store_root / LIVE)
        except OSError as exc:
            log.warning("cannot record the live version in the store: %s", exc)

    def ensure_epoch(self) -> bool:
        """Set this deployment's epoch key if it is missing; True when it was missing (a new or wiped Redis)."""
        return bool(self.redis.set(self.keys.epoch(), uuid.uuid4().hex, nx=True))

    def recover(self) -> str | None:
        """Rebuild a registry Redis lost from the store's journal, and make the last live version live again.

        Only when Redis has no registry at all (nothing is overwritten). Returns the version made live, or None.
        """
        journal = self.store_root / JOURNAL
        if self.redis.zcard(self.keys.model_versions()) or not journal.is_file():
            return None
        entries = []
        for line in journal.read_text(encoding="utf-8").splitlines():
            try:
                entries.append(ModelEntry(**{k: v for k, v in json.loads(line).items() if k != "version"},
                                          version=""))
            except (ValueError, TypeError):
                continue  # a torn last line: skip it
        restored: dict[str, str] = {}
        for e in entries:
            if not self.artifact_path(e).is_dir():
                continue  # the artifact itself is gone: nothing to serve
            restored[e.sha256] = self._add_entry(e)
        live = None
        with contextlib.suppress(OSError, ValueError):
            live = json.loads((self.store_root / LIVE).read_text()).get("sha256")
        version = restored.get(live) if live else None
        if version is None and restored:
            version = list(restored.values())[-1]  # no record of the live one: the newest
        if version is not None:
            self.promote(version)
        log.warning("registry rebuilt from %s: %d version(s), %s live", journal, len(restored), version)
        return version

    def publish(
        self,
        artifact_dir: str | Path,
        *,
        threshold: float,
        alpha: float,
        data_sizes: Mapping[str, int] | None = None,
        gates: Mapping[str, Any] | None = None,
        parent: str | None = None,
        extra: Mapping[str, Any] | None = None,
        expected: str | None | object = ANY,
        move: bool = False,
        calibration: str = "marginal",
        delta: float | None = None,
    ) -> ModelEntry:
        """Store, register and make current in one call.

        `expected` is the version the caller believes is current (typically the parent the candidate was gated
        against; None = no model yet). If the pointer moved meanwhile, the entry stays registered but is not
        made current, and `PointerConflictError` is raised.
        """
        entry = self.register(
            artifact_dir,
            threshold=threshold,
            alpha=alpha,
            data_sizes=data_sizes,
            gates=gates,
            parent=parent,
            extra=extra,
            move=move,
            calibration=calibration,
            delta=delta,
        )
        self.promote(entry.version, expected=expected)
        return entry

    def promote(self, version: str, *, expected: str | None | object = ANY) -> ModelEntry:
        """Make `version` current (compare-and-set against `expected` unless ANY); the old one goes on the
        rollback list. Returns the entry."""
        check, exp = ("0", "") if expected is ANY else ("1", expected or "")
        res = self._promote(
            keys=[self.keys.model_current(), self.keys.model_previous(), self.keys.model_entry(version)],
            args=[version, check, exp, MAX_PREVIOUS],
        )
        status, cur = _s(res[0]), _s(res[1]) or None
        if status == "missing":
            raise VersionNotFoundError(f"model version {version!r} is not registered (see 'dlsr model list')")
        if status == "conflict":
            raise PointerConflictError(exp or None, cur)
        entry = self.entry(version)
        self._mark_live(entry)
        return entry

    def rollback(self, *, expected: str | None | object = ANY) -> ModelEntry:
        """Return to the previous live version; returns its entry."""
        check, exp = ("0", "") if expected is ANY else ("1", expected or "")
        res = self._rollback(keys=[self.keys.model_current(), self.keys.model_previous()], args=[check, exp])
        status = _s(res[0])
        if status == "conflict":
            raise PointerConflictError(exp or None, _s(res[1]) or None)
        if status == "empty":
            raise RegistryError(
                f"no earlier version to roll back to (current is {_s(res[1]) or 'none'}); "
                "use 'dlsr model promote VERSION' to pick one"
            )
        entry = self.entry(str(_s(res[1])))
        self._mark_live(entry)
        return entry

    def record_forced(self, version: str, *, by: str, action: str, problems: list[str]) -> None:
        """Note on the entry that an operator made it live past the model checks (who, when, what was wrong)."""
        note = {"by": by, "at": time.time(), "action": action, "problems": problems}
        self.redis.hset(self.keys.model_entry(version), "forced", json.dumps(note, sort_keys=True))

    def current_version(self) -> str | None:
        """The live version, or None before the first publish."""
        return _s(self.redis.get(self.keys.model_current())) or None

    def previous_versions(self) -> list[str]:
        """Earlier live versions, newest first (what rollback returns to)."""
        return [str(_s(v)) for v in self.redis.lrange(self.keys.model_previous(), 0, -1)]

    def entry(self, version: str) -> ModelEntry:
        """The registry entry of one version; VersionNotFoundError when unknown."""
        raw = self.redis.hgetall(self.keys.model_entry(version))
        if not raw:
            raise VersionNotFoundError(f"model version {version!r} is not registered (see 'dlsr model list')")
        return ModelEntry.from_hash(raw)

    def current_entry(self) -> ModelEntry | None:
        """Entry of the live version, or None."""
        version = self.current_version()
        return self.entry(version) if version else None

    def list_versions(self) -> list[ModelEntry]:
        """Every registered version, oldest first."""
        names = [str(_s(v)) for v in self.redis.zrange(self.keys.model_versions(), 0, -1)]
        names.sort(key=version_number)
        if not names:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.hgetall(self.keys.model_entry(name))
        return [ModelEntry.from_hash(raw) for raw in pipe.execute() if raw]

    def verify(self, entry: ModelEntry) -> Path:
        """Path of the entry's artifact after checking its digest; RegistryError if missing or altered."""
        path = self.artifact_path(entry)
        if not path.is_dir():
            raise RegistryError(
                f"artifact of {entry.version} not found at {path}: is the store volume mounted at "
                f"the configured path (model.artifact_store)?"
            )
        try:
            verify_artifact(path, entry.sha256)
        except RegistryError as exc:
            raise RegistryError(f"{entry.version}: {exc}") from exc
        return path
