"""FLUX LoRAs on the 4-bit transformer, without re-quantizing anything.

- :mod:`engine.lora.formats`: LoRA files (diffusers/PEFT, kohya, ComfyUI, XLabs) read and
  mapped onto the transformer's modules, checked before anything is applied;
- :mod:`engine.lora.manager`: the active set on one transformer, changed all-or-nothing;
- :mod:`engine.lora.store`: where LoRAs come from (URLs, the hub, civitai, data: URLs, .tar
  archives, a configured folder) and the one cache of files and parsed LoRAs.
"""

from engine.lora.formats import LoraError, LoraFactor, ParsedLora, detect_format, parse_lora, read_lora
from engine.lora.manager import LoraManager
from engine.lora.store import LoraStore, Source, StoreConfig, resolve_source

__all__ = [
    "LoraError",
    "LoraFactor",
    "LoraManager",
    "LoraStore",
    "ParsedLora",
    "Source",
    "StoreConfig",
    "detect_format",
    "parse_lora",
    "read_lora",
    "resolve_source",
]
