"""The backbone names timm knows, read from timm's installed sources without importing timm (or torch).

`timm.list_models()` imports torch, which would make reading settings take seconds. Every timm model is a function
decorated `@register_model` in `timm/models/*.py` (renamed ones are listed in `register_model_deprecations`), so
scanning those files gives the same list (checked against `timm.list_models()` in tests/config) in ~20 ms.
"""

from __future__ import annotations

import difflib
import importlib.util
import re
from functools import lru_cache
from pathlib import Path

_REGISTERED = re.compile(r"@register_model\s*\n\s*def\s+(\w+)\s*\(")
_DEPRECATIONS = re.compile(r"register_model_deprecations\(\s*__name__\s*,\s*\{(.*?)\}\s*\)", re.S)
_DEPRECATED_NAME = re.compile(r"['\"](\w+)['\"]\s*:")
# Names timm resolves elsewhere (the Hugging Face hub, local files): not checkable offline, accepted as given.
_EXTERNAL = ("hf-hub:", "hf_hub:", "local-dir:")


@lru_cache(maxsize=1)
def timm_model_names() -> frozenset[str] | None:
    """Every model name the installed timm registers (deprecated aliases included); None when that cannot be
    told (timm missing, or a layout this scan does not recognise): then names are not checked."""
    try:
        spec = importlib.util.find_spec("timm")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    names: set[str] = set()
    for path in sorted((Path(spec.origin).parent / "models").glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except OSError:
            continue
        names.update(_REGISTERED.findall(text))
        for block in _DEPRECATIONS.findall(text):
            names.update(_DEPRECATED_NAME.findall(block))
    return frozenset(names) if len(names) > 100 else None


def check_model_name(name: str) -> str | None:
    """None when timm knows `name` (a `name.pretrained_tag` counts as its name), else the one-line reason."""
    if name.startswith(_EXTERNAL):
        return None
    known = timm_model_names()
    if known is None:
        return None
    base = name.split(".", 1)[0]
    if base in known:
        return None
    close = difflib.get_close_matches(base, sorted(known), n=3, cutoff=0.6)
    hint = (
        f"did you mean {', '.join(close)}?"
        if close
        else "e.g. tf_efficientnet_lite0; timm.list_models() lists them"
    )
    return f"timm has no model {base!r} ({hint})"
