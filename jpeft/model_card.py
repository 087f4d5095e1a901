"""The model card (``README.md``) written next to an adapter, as peft's ``save_pretrained``.

peft 0.21 (``PeftModel.create_or_update_model_card``) writes a Hugging Face model card
whose YAML front matter says ``library_name: peft``, ``base_model: <base>``,
``pipeline_tag: text-generation`` (causal LMs) and tags (``base_model:adapter:<base>``,
``lora`` for LoRA); the Hub reads these to list the adapter under its base model. An
existing card keeps its text and other fields; ours are set or added. The front matter
is YAML (written with PyYAML, a dependency already).
"""

from __future__ import annotations

import os
from typing import Any

import yaml

from jpeft.models.atomic import write_text

CARD_NAME = "README.md"
OWN_TYPE_PREFIX = "JPEFT_"
"""``peft_type`` prefix of jpeft's own adapter types (peft has no such method to load them)."""
_BODY = """
# {title}

A {method} adapter for `{base}`, saved by jpeft {how}.
"""
_PEFT_LOADS = (
    "in peft's format: load it with `peft.PeftModel.from_pretrained` or `jpeft.load_hf_adapter`"
)
_JPEFT_ONLY = "in its own format, which peft cannot load: load it with `jpeft.load_hf_adapter`"


def peft_loads(peft_type: str) -> bool:
    """Whether HF peft can load an adapter of ``peft_type`` (all but jpeft's own types).

    Example:
        >>> peft_loads("LORA"), peft_loads("JPEFT_BOTTLENECK_ADAPTER")
        (True, False)
    """
    return not peft_type.startswith(OWN_TYPE_PREFIX)


def write_model_card(out_dir: str | os.PathLike, base_model: str | None, peft_type: str) -> None:
    """Write or update ``out_dir/README.md``'s front matter for an adapter of ``peft_type``
    (``library_name: jpeft`` for jpeft's own types, which peft cannot load).

    ``base_model`` is the adapter's ``base_model_name_or_path`` (omitted when None).
    A card already there keeps its body and any other front-matter fields; tags are
    merged. Written atomically (:func:`jpeft.models.atomic.write_text`).

    Raises ``ValueError`` for an existing card whose front matter is not a YAML mapping.

    Example:
        >>> import tempfile
        >>> out = tempfile.mkdtemp()
        >>> write_model_card(out, "org/base", "LORA")
        >>> open(os.path.join(out, "README.md")).read().splitlines()[:3]
        ['---', 'base_model: org/base', 'library_name: peft']
    """
    path = os.path.join(os.fspath(out_dir), CARD_NAME)
    meta: dict[str, Any] = {}
    body = _BODY.format(
        title=f"{peft_type} adapter" + (f" for {base_model}" if base_model else ""),
        method=peft_type,
        base=base_model or "its base model",
        how=_PEFT_LOADS if peft_loads(peft_type) else _JPEFT_ONLY,
    )
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            meta, body = _split(f.read(), path)
    meta["library_name"] = "peft" if peft_loads(peft_type) else "jpeft"
    meta.setdefault("pipeline_tag", "text-generation")
    tags = set(meta.get("tags") or ())
    if peft_type == "LORA":
        tags.add("lora")
    if base_model is not None:
        meta["base_model"] = base_model
        tags.add(f"base_model:adapter:{base_model}")
    if tags:
        meta["tags"] = sorted(tags)
    front = yaml.safe_dump(meta, sort_keys=True, allow_unicode=True)
    write_text(path, f"---\n{front}---\n{body}")


def _split(text: str, path: str) -> tuple[dict[str, Any], str]:
    """``(front matter, body)`` of a model card (empty front matter when it has none)."""
    if not text.startswith("---\n"):
        return {}, text
    end = text.find("\n---\n", 4)
    if end < 0:
        return {}, text
    meta = yaml.safe_load(text[4:end]) or {}
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: the front matter is a {type(meta).__name__}, expected a mapping")
    return meta, text[end + 5 :]
