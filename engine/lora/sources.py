"""Where LoRAs come from: a ``lora_weights`` string resolved to what to fetch (:func:`resolve_source`).

``lora_weights`` (and ``extra_lora``) take the forms Replicate's flux LoRA models take, where
they can be served without Replicate's platform:

==========================================  =================================================
``https://...`` any URL of a .safetensors    downloaded as is
``https://huggingface.co/o/r/blob/rev/f``    rewritten to the hub's ``resolve`` URL
``https://huggingface.co/o/r/resolve/...``   as is (the hub's endpoint, HF_ENDPOINT, applies)
``huggingface.co/o/r``, ``o/r``              the repository's only .safetensors (or its
                                             ``lora.safetensors``), listed by the hub API
``o/r/path/file.safetensors``                that file of the hub repository, revision main
``https://civitai.com/models/<id>[/slug]``   the model's latest version (``?modelVersionId=``
                                             picks one), through civitai's API
``https://civitai.com/api/download/...``     as is
``data:...;base64,...``                      decoded (within the download cap)
a ``.tar`` archive (any of the above)        its one .safetensors (or ``lora.safetensors``),
                                             as Replicate's trainer writes them
a path                                       only inside the configured LoRA folder
``owner/model:version``, r8.im, replicate.com refused: resolving them needs Replicate's API
==========================================  =================================================

Pure: no I/O but path checks; engine.lora.store fetches and caches what this resolves.
"""

from __future__ import annotations

import dataclasses
import re
import urllib.parse
from pathlib import Path

from engine.download import redact
from engine.lora.formats import LoraError

HUB = "https://huggingface.co"
CIVITAI = "https://civitai.com"
_HUB_HOSTS = ("huggingface.co", "www.huggingface.co", "hf.co")
_CIVITAI_HOSTS = ("civitai.com", "www.civitai.com")
_COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclasses.dataclass(frozen=True)
class Source:
    """A resolved ``lora_weights`` value: what to fetch, and how to show it in logs."""

    kind: str  # "url" | "hub_repo" | "civitai_model" | "data" | "local"
    location: str  # download URL, "owner/repo", civitai model id, the data URL, or a path
    revision: str = "main"  # hub_repo only
    # Whether the same source always names the same bytes: a hub commit revision, a civitai
    # version id, a data: URL. Others (any other URL, resolve/main, owner/repo, a civitai model's
    # latest version) may change, and are revalidated on every use (engine.lora.store: ETag or
    # Last-Modified; without either, fetched again once older than StoreConfig.mutable_ttl_s).
    immutable: bool = False

    @property
    def shown(self) -> str:
        if self.kind == "data":
            return redact(self.location)
        if self.kind == "hub_repo":
            return f"hub {self.location}@{self.revision}"
        if self.kind == "civitai_model":
            return f"civitai model {self.location}"
        return redact(self.location) if self.kind == "url" else self.location


_REPLICATE_REF = re.compile(r"[\w.-]+/[\w.-]+:[0-9a-fA-F]{6,}")
_HUB_REF = re.compile(r"([\w.-]+/[\w.-]+)(/[^\s?#]+)?")


def _replicate_refusal(text: str) -> LoraError:
    return LoraError(
        f"{text!r} is a Replicate model reference; resolving it needs Replicate's platform, which this "
        "container does not use. Pass the LoRA file's own URL instead (e.g. the .tar or .safetensors "
        "URL from the training's output)"
    )


def resolve_source(
    text: str, *, hub: str = HUB, civitai: str = CIVITAI, local_dir: Path | None = None
) -> Source:
    """Map a ``lora_weights`` string to what has to be fetched. Pure: no I/O but path checks.

    ``hub`` and ``civitai`` are the base URLs that huggingface.co and civitai.com links are
    rewritten to (the real sites by default).
    """
    text = text.strip()
    if not text:
        raise LoraError("empty source")
    if text.startswith("data:"):
        return Source("data", text, immutable=True)
    if _REPLICATE_REF.fullmatch(text) or text.startswith(("r8.im/", "replicate.com/")):
        raise _replicate_refusal(text)
    if re.match(r"(www\.)?(huggingface\.co|hf\.co|civitai\.com)/", text):
        text = "https://" + text
    if text.startswith("file://"):
        return _local(urllib.parse.unquote(urllib.parse.urlsplit(text).path), local_dir)
    if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*://", text):
        return resolve_url(text, hub, civitai)
    if text.startswith(("/", "~", "./", "../")) or (local_dir is not None and _inside(local_dir, text)):
        return _local(text, local_dir)
    if m := _HUB_REF.fullmatch(text):
        repo, file = m.group(1), (m.group(2) or "").lstrip("/")
        _check_hub_path([*repo.split("/"), *(file.split("/") if file else [])], text)
        if file:
            return Source("url", f"{hub.rstrip('/')}/{repo}/resolve/main/{urllib.parse.quote(file)}")
        return Source("hub_repo", repo)
    return _local(text, local_dir)


def _check_hub_path(parts: list[str], text: str) -> None:
    """Hub paths are owner/repo[/file...]: no '.', '..' or empty segment, no '/' hidden as %2F.

    Else ``owner/repo/../../../api/...`` would send the hub token to any path on the hub's host.
    """
    for p in parts:
        if p in ("", ".", "..") or "/" in p or "\\" in p:
            raise LoraError(
                f"{redact(text)}: a Hugging Face path may not hold '.', '..', empty or escaped-'/' segments"
            )


def _inside(local_dir: Path, text: str) -> bool:
    path = (local_dir / Path(text).expanduser()).resolve()
    return path.is_relative_to(local_dir.resolve()) and path.is_file()


def _local(text: str, local_dir: Path | None) -> Source:
    if local_dir is None:  # one message whether or not the path exists
        raise LoraError(
            f"{text!r} is not a URL or hub reference, and local paths are not served "
            "(the server's operator can allow paths inside one folder with SVDQ_LORA_DIR)"
        )
    path = (local_dir / Path(text).expanduser()).resolve()
    if not path.is_relative_to(local_dir.resolve()) or not path.is_file():
        raise LoraError(f"{text!r} is not a file inside the LoRA folder")
    return Source("local", str(path))


def resolve_url(url: str, hub: str, civitai: str) -> Source:
    """An http(s) URL resolved: hub and civitai pages to what they name, any other URL as is."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise LoraError(f"{redact(url)}: only http(s) and data: URLs are fetched")
    host = (parts.hostname or "").lower()
    path = [urllib.parse.unquote(p) for p in parts.path.split("/") if p]
    if host in ("replicate.com", "www.replicate.com", "r8.im"):
        raise _replicate_refusal(redact(url))
    if host in _HUB_HOSTS:
        _check_hub_path([urllib.parse.unquote(p) for p in parts.path.strip("/").split("/")], url)
        prefix = path[:1] if path[:1] in (["datasets"], ["spaces"]) else []
        rest = path[len(prefix) :]
        if len(rest) == 2 and not prefix:
            return Source("hub_repo", "/".join(rest))
        if len(rest) == 4 and rest[2] == "tree" and not prefix:
            return Source(
                "hub_repo", "/".join(rest[:2]), revision=rest[3], immutable=bool(_COMMIT.fullmatch(rest[3]))
            )
        if len(rest) >= 5 and rest[2] in ("blob", "resolve"):
            quoted = "/".join(urllib.parse.quote(p) for p in [*prefix, *rest[:2], "resolve", *rest[3:]])
            return Source("url", f"{hub.rstrip('/')}/{quoted}", immutable=bool(_COMMIT.fullmatch(rest[3])))
        raise LoraError(
            f"{redact(url)}: not a Hugging Face file or repository URL "
            "(expected huggingface.co/owner/repo or .../blob|resolve/<revision>/<file>)"
        )
    if host in _CIVITAI_HOSTS:
        query = dict(urllib.parse.parse_qsl(parts.query))
        if len(path) >= 2 and path[0] == "models" and path[1].isdigit():
            if (version := query.get("modelVersionId", "")).isdigit():  # a version's files never change
                return Source("url", f"{civitai.rstrip('/')}/api/download/models/{version}", immutable=True)
            return Source("civitai_model", path[1])
        if len(path) == 4 and path[:3] == ["api", "download", "models"] and path[3].isdigit():
            q = f"?{parts.query}" if parts.query else ""
            return Source("url", f"{civitai.rstrip('/')}/api/download/models/{path[3]}{q}", immutable=True)
        raise LoraError(
            f"{redact(url)}: not a civitai model URL (expected civitai.com/models/<id>[/<name>]"
            "[?modelVersionId=<id>] or civitai.com/api/download/models/<version id>)"
        )
    return Source("url", url)

