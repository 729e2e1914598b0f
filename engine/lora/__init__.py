"""FLUX LoRAs on the 4-bit transformer, without re-quantizing anything.

- :mod:`engine.lora.formats`: LoRA files (diffusers/PEFT, kohya, ComfyUI, XLabs) read and
  mapped onto the transformer's modules, checked before anything is applied;
- :mod:`engine.lora.manager`: the active set on one transformer, changed all-or-nothing;
- :mod:`engine.lora.sources`: where LoRAs come from (URLs, the hub, civitai, data: URLs, a
  configured folder), resolved without I/O;
- :mod:`engine.lora.store`: their fetching (.tar archives unpacked) and the one cache of files
  and parsed LoRAs.
"""

from engine.lora.formats import LoraError, LoraFactor, ParsedLora, detect_format, parse_lora, read_lora
from engine.lora.manager import LoraManager
from engine.lora.sources import Source, resolve_source
from engine.lora.store import LoraStore, StoreConfig

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
