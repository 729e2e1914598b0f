"""The set of LoRAs applied to one transformer, changed all-or-nothing.

On SVDQLinear and W4A16Linear a LoRA widens the 16-bit low-rank branch
(engine/modules/lora_slots.py); a SplitInputLinear splits the down factor by input slice; on a
layer that stays 16-bit (embedders, output projection) it is merged into the float weight, and
the original weight tensor is kept to restore it bit for bit. LoRAs of layers that a fused
block holds as one (q/k/v, proj_mlp) arrive here already as factors of the fused layer
(engine.lora.formats). Changes are made on a thread of the manager's own, so that a cancel
raised in the caller's thread never leaves a layer half changed (LoraManager).
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time

import torch
from torch import nn

from engine.flux.layers import SplitInputLinear
from engine.lora.formats import ParsedLora
from engine.modules import SVDQLinear, W4A16Linear

logger = logging.getLogger(__name__)


POLL_S = 0.005  # how often the waiting caller checks whether the apply thread is done


class _Aborted(Exception):
    """The caller was cancelled while the apply thread worked: stop and put everything back."""


class LoraManager:
    """The set of LoRAs applied to one transformer; every change is all-or-nothing.

    All-or-nothing under any exception, coglet's cancel included. coglet cancels a prediction by
    raising ``CancelationException`` (a BaseException) in the prediction's thread at whatever
    bytecode it is running (``PyThreadState_SetAsyncExc``), which can fall between two
    assignments of one layer's tensors. So the model's tensors are changed only on a thread of
    this manager's own, which nothing cancels: the caller polls it in short sleeps and, if
    cancelled meanwhile, asks it to stop, waits until it has put the previous state back, and
    only then re-raises. The previous state is kept as the very tensors it was made of (each
    layer's slots and built factors, each merged 16-bit weight), so restoring it assigns
    references and allocates nothing: it gives the previous model bit for bit and cannot fail
    half way. The record of what is applied (``active``) is changed on the same thread, together
    with the tensors.
    """

    def __init__(self, transformer: nn.Module) -> None:
        self.transformer = transformer
        self._applied: list[tuple[str, ParsedLora, float]] = []
        self._merged: dict[str, torch.Tensor] = {}  # 16-bit module -> its original weight

    @property
    def active(self) -> list[tuple[str, float]]:
        return [(name, scale) for name, _, scale in self._applied]

    def set(self, loras: list[tuple[str, ParsedLora, float]]) -> None:
        """Replace the active LoRAs by ``[(name, parsed, scale)]`` (empty: the base model).

        If applying fails, or the calling thread is cancelled (any BaseException raised in it
        while this runs), the previous set is restored and the exception raised.
        """
        loras = list(loras)
        if [(n, id(p), s) for n, p, s in loras] == [(n, id(p), s) for n, p, s in self._applied]:
            return
        abort = threading.Event()
        previous, cancel = self._run(self._set_now, loras, abort)
        if cancel is not None:
            if previous is not None:  # it had finished: undo it
                self._run(self._restore, previous)
            raise cancel

    def _run(self, fn, *args) -> tuple:
        """Run ``fn(*args)`` on a thread of its own; ``(result, None)`` or ``(result or None, cancel)``.

        The job's own exception is raised here. An exception raised in this thread while it
        waits (a cancel) sets the job's ``abort`` event (its last argument, where it takes one)
        and is returned once the job has ended, so that nothing changes the model after the
        caller goes on. The wait is a sleep loop over a plain list, not a lock or a condition:
        an asynchronous exception landing inside a lock's bookkeeping could leave it held.
        """
        box: list[tuple[bool, object]] = []
        context = contextvars.copy_context()  # coglet routes a prediction's log lines by one

        def job() -> None:
            try:
                box.append((True, context.run(fn, *args)))
            except BaseException as e:  # handed to the waiting caller
                box.append((False, e))

        thread = threading.Thread(target=job, name="lora-apply", daemon=True)
        cancel: BaseException | None = None
        while True:
            try:
                if thread.ident is None:
                    thread.start()
                while not box:
                    time.sleep(POLL_S)
                break
            except BaseException as e:  # an asynchronous cancel of the calling thread
                cancel = cancel or e
                if args and isinstance(args[-1], threading.Event):
                    args[-1].set()
        ok, value = box[0]
        if not ok and cancel is None:
            raise value
        return (value if ok else None), cancel

    @torch.no_grad()
    def _set_now(self, loras: list[tuple[str, ParsedLora, float]], abort: threading.Event) -> tuple:
        """On the apply thread: apply ``loras``; on any exception put the previous state back.

        Returns the previous state (for the caller to restore if it was cancelled meanwhile).
        """
        previous = self._snapshot()
        try:
            self._clear()
            for name, parsed, scale in loras:
                self._apply(name, parsed, scale, abort)
            self._applied = loras
        except BaseException:
            self._restore(previous)
            raise
        return previous

    def _snapshot(self) -> tuple:
        slots = {
            name: m.lora_state()
            for name, m in self.transformer.named_modules()
            if isinstance(m, SVDQLinear | W4A16Linear)
        }
        weights = {name: m.weight for name, m in self.transformer.named_modules() if isinstance(m, nn.Linear)}
        return list(self._applied), dict(self._merged), slots, weights

    def _restore(self, state: tuple) -> None:
        applied, merged, slots, weights = state
        modules = dict(self.transformer.named_modules())
        for name, slot_state in slots.items():
            modules[name].restore_lora_state(slot_state)
        for name, weight in weights.items():
            if modules[name].weight is not weight:
                modules[name].weight = weight
        self._merged = merged
        self._applied = applied

    def clear(self) -> None:
        self.set([])

    def _clear(self) -> None:
        modules = dict(self.transformer.named_modules())
        for m in modules.values():
            if isinstance(m, SVDQLinear | W4A16Linear):
                m.clear_loras()
        for name, weight in self._merged.items():
            modules[name].weight = weight
        self._merged.clear()
        self._applied = []

    @torch.no_grad()
    def _add(
        self, name: str, module_name: str, m: nn.Module, down: torch.Tensor, up: torch.Tensor, s: float
    ) -> None:
        """One LoRA on one layer: a slot of a quantized layer, or merged into a 16-bit weight."""
        if isinstance(m, SVDQLinear | W4A16Linear):
            m.add_lora(name, down, up, s)
            return
        original = self._merged.setdefault(module_name, m.weight)  # kept to restore bit for bit
        w = m.weight
        merged = w.float() + s * (up.to(w.device) @ down.to(w.device))
        m.weight = nn.Parameter(merged.to(original.dtype), requires_grad=False)

    @torch.no_grad()
    def _apply(self, name: str, parsed: ParsedLora, scale: float, abort: threading.Event) -> None:
        modules = dict(self.transformer.named_modules())
        for f in parsed.factors:
            if abort.is_set():
                raise _Aborted(f"LoRA {name}: cancelled")
            m = modules[f.module]
            s = scale * f.scale
            if isinstance(m, SplitInputLinear):
                for i, (part, down) in enumerate(zip(m.parts, f.down.split(m.sizes, dim=1), strict=True)):
                    self._add(name, f"{f.module}.parts.{i}", part, down, f.up, s)
            else:
                self._add(name, f.module, m, f.down, f.up, s)
        if parsed.unmatched:
            logger.warning(
                "LoRA %s: %d key(s) match no layer of this model and were not applied: %s",
                name,
                len(parsed.unmatched),
                ", ".join(parsed.unmatched[:8]),
            )
        if parsed.text_encoder:
            logger.warning(
                "LoRA %s: %d text-encoder key(s) are not applied (transformer LoRAs only): %s",
                name,
                len(parsed.text_encoder),
                ", ".join(parsed.text_encoder[:4]),
            )
        logger.info(
            "LoRA %s (%s format): %d layers, scale %g", name, parsed.format, len(parsed.factors), scale
        )
