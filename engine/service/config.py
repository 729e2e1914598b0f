"""The server's configuration: every environment variable it reads, read once (:meth:`ServiceConfig.from_env`)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path

from engine import kernels, memory
from engine.egress import EgressPolicy
from engine.flux import attention
from engine.lora import StoreConfig
from engine.lora.sources import CIVITAI, HUB
from engine.lora.store import CACHE_BYTES, MAX_DOWNLOAD_BYTES
from engine.weights import BAKED, Sources, cache_dir

MODEL_ENV = "SVDQ_MODEL"  # auto | tiny | tiny-shapes | a model name of weights/manifest.json


@dataclasses.dataclass(frozen=True)
class ServiceConfig:
    """The server's configuration, read from the environment in one place (:meth:`from_env`).

    ========================= ====================================================== =========
    variable                  meaning                                                default
    ========================= ====================================================== =========
    SVDQ_MODEL                auto, tiny, tiny-shapes, or a model of manifest.json    auto
    SVDQ_WEIGHTS_DIR          the weights cache                                       weights/cache
    HF_HUB_OFFLINE=1          no downloads                                            off
    SVDQ_LORA_DIR             folder whose files lora_weights may name by path        none (no paths)
    SVDQ_LORA_CACHE_BYTES     bound on the LoRA download cache                        10 GiB
    SVDQ_LORA_MAX_BYTES       cap on one LoRA download                                4 GiB
    SVDQ_LORA_DEADLINE_S      time allowed to fetch one LoRA                          300
    HF_ENDPOINT, HF_TOKEN     the hub's base URL and token (sent to the hub only)     huggingface.co
    SVDQ_WEIGHTS_URL          a mirror: every weight file from <url>/<path>           none (sources)
    SVDQ_CIVITAI_ENDPOINT,    civitai's base URL and token (sent to civitai only)     civitai.com
    CIVITAI_API_TOKEN
    SVDQ_EGRESS_ALLOW         networks LoRA requests may reach although not public    none
                              (dev/tests only: e.g. 127.0.0.0/8; engine.egress)
    SVDQ_KERNELS              kernel backend: auto, reference, triton, cuda           auto
    SVDQ_W4A8                 Hopper's W4A8 route (FP8 activations): auto, off        auto
    SVDQ_ATTENTION            go_fast's attention: auto, sage, sdpa                   auto
    SVDQ_MEMORY               memory mode: auto, fast, small (engine/memory.py)       auto
    ========================= ====================================================== =========
    """

    weights_dir: Path
    model: str = "auto"
    offline: bool = False
    lora: StoreConfig | None = None
    kernels: str = "auto"
    w4a8: str = "auto"  # "off": W4A4 everywhere (the A40's numerics on Hopper too)
    attention: str = "auto"
    sources: Sources = dataclasses.field(default_factory=Sources)  # where weight files come from (mirror, hub, token)
    baked_dir: Path = BAKED  # weights baked into the image (scripts/bake_weights.py), used first
    memory: str = "auto"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServiceConfig:
        env = os.environ if environ is None else environ
        weights = cache_dir(env)

        def number(name: str, default: float) -> float:
            raw = env.get(name, "").strip()
            try:
                return float(raw) if raw else default
            except ValueError:
                raise ValueError(f"{name}={raw!r} is not a number") from None

        local = env.get("SVDQ_LORA_DIR", "").strip()
        lora = StoreConfig(
            root=weights / "loras",
            cache_bytes=int(number("SVDQ_LORA_CACHE_BYTES", CACHE_BYTES)),
            max_download_bytes=int(number("SVDQ_LORA_MAX_BYTES", MAX_DOWNLOAD_BYTES)),
            deadline_s=number("SVDQ_LORA_DEADLINE_S", 300.0),
            local_dir=Path(local).expanduser() if local else None,
            hub=env.get("HF_ENDPOINT", "").strip() or HUB,
            civitai=env.get("SVDQ_CIVITAI_ENDPOINT", "").strip() or CIVITAI,
            hf_token=env.get("HF_TOKEN") or None,
            civitai_token=env.get("CIVITAI_API_TOKEN") or None,
            egress=EgressPolicy.parse(env.get("SVDQ_EGRESS_ALLOW", "")),
        )
        attention_kind = env.get("SVDQ_ATTENTION", "auto").strip().lower() or "auto"
        if attention_kind not in attention.KINDS:
            raise ValueError(f"SVDQ_ATTENTION={attention_kind!r}: choose one of {', '.join(attention.KINDS)}")
        w4a8 = env.get("SVDQ_W4A8", "auto").strip().lower() or "auto"
        if w4a8 not in ("auto", "off"):
            raise ValueError(f"SVDQ_W4A8={w4a8!r}: choose auto or off")
        return cls(
            weights_dir=weights,
            model=env.get(MODEL_ENV, "auto").strip() or "auto",
            offline=env.get("HF_HUB_OFFLINE") == "1",
            lora=lora,
            kernels=env.get(kernels.ENV_VAR, "auto").strip() or "auto",
            w4a8=w4a8,
            attention=attention_kind,
            sources=Sources.from_env(env),
            memory=memory.parse(env.get(memory.ENV_VAR)),
        )
