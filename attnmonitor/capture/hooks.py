"""Hook lifecycle of a capture: which target call is running, and the interception scope around it.

Hooks go on three kinds of modules (all removed together, idempotently, also after an exception):

- **targets**: each call becomes a :class:`~attnmonitor.capture.calls.ModuleCall` on a stack while it
  runs (innermost last), and the interceptor is active inside it;
- **fast-path hosts** (``nn.TransformerEncoder(Layer)``): the interceptor is active while they run,
  which keeps them off the eval-mode fused path that would skip their attention submodule;
- **ancestors** of the targets: their first entry marks the start of a forward of the model.

On a model that runs through ``torch.compile`` (the model, or any of its submodules), hooks would be
traced into the compiled graph (or, added later, silently skipped by it). There they are registered
only while calls are intercepted, and those forwards run eagerly under
``torch.compiler.set_stance("force_eager")``: steps that capture nothing run the compiled graph as
it is (no graph break, no recompilation), captured steps run the model's plain Python code.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from attnmonitor.capture.calls import CallTracker, ModuleCall, attention_kind
from attnmonitor.capture.discovery import fast_path_hosts, target_name


class CallHooks:
    """Forward hooks tracking the running target calls of a model.

    Args:
        model: the hooked model.
        targets: ``{name: module}`` target modules.
        interceptor: entered while at least one hooked call runs with ``intercepting()`` True.
        intercepting: whether calls starting now should be intercepted.
        tracker: layer names, kinds and per-forward bookkeeping of calls.
        on_start: called with each intercepted target call and its ``(args, kwargs)`` once it is running.
        on_end: called with each intercepted target call, its output, and whether it produced attention.
    """

    def __init__(
        self,
        model: nn.Module,
        targets: dict[str, nn.Module],
        interceptor: AbstractContextManager[Any],
        intercepting: Callable[[], bool],
        tracker: CallTracker,
        on_start: Callable[[ModuleCall, tuple[Any, ...], dict[str, Any]], None],
        on_end: Callable[[ModuleCall, Any, bool], None],
    ) -> None:
        self.model, self.targets, self.tracker = model, targets, tracker
        self._names = {id(m): target_name(name, m) for name, m in targets.items()}
        self._interceptor, self._intercepting = interceptor, intercepting
        self._on_start, self._on_end = on_start, on_end
        self.running: list[ModuleCall] = []
        """Target calls running now, innermost last."""
        self.records = 0
        """Attention computations seen so far (the capture counts them)."""
        self._frames: list[tuple[bool, int]] = []  # per hooked call: (intercepted, records before)
        self._scope_depth = 0
        self._forward_depth = 0  # ancestors of targets running now
        self._handles: list[RemovableHandle] = []
        self._attached = False
        self._compiled = False
        self._eager_stance: Any = None  # the force-eager stance entered while a compiled model is intercepted

    def attach(self) -> None:
        """Register every hook (idempotent); on a compiled model, only while :meth:`update` says so."""
        if self._attached:
            return
        self._attached, self._compiled = True, is_compiled(self.model)
        if self._compiled:
            self.update()
        else:
            self._register()

    def update(self) -> None:
        """On a compiled model, hook it and run it eagerly from now on if ``intercepting()``, else
        leave it to its compiled graph. Call it outside the model's forward when ``intercepting()``
        may have changed."""
        if not (self._attached and self._compiled):
            return
        intercepting = self._intercepting()
        if intercepting and not self._handles:
            self._eager_stance = torch.compiler.set_stance("force_eager")
            self._register()
        elif not intercepting and self._handles:
            self._unregister()

    def _register(self) -> None:
        for module in self.targets.values():
            self._handles.append(module.register_forward_pre_hook(self._enter_target, with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._exit_target, always_call=True))
        for host in fast_path_hosts(self.model, self.targets):
            self._handles.append(host.register_forward_pre_hook(self._enter_host))
            self._handles.append(host.register_forward_hook(self._exit_host, always_call=True))
        for ancestor in ancestors(self.model, self.targets):
            self._handles.append(ancestor.register_forward_pre_hook(self._enter_ancestor))
            self._handles.append(ancestor.register_forward_hook(self._exit_ancestor, always_call=True))

    def _unregister(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._eager_stance is not None:
            self._eager_stance.__exit__(None, None, None)
            self._eager_stance = None

    def remove(self) -> None:
        """Remove every hook and leave any active interception (idempotent)."""
        self._unregister()
        self._attached = False
        while self._scope_depth:
            self._leave_scope()
        self.running.clear()
        self._frames.clear()
        self._forward_depth = 0

    def _enter_scope(self) -> None:
        if self._scope_depth == 0:
            self._interceptor.__enter__()
        self._scope_depth += 1

    def _leave_scope(self) -> None:
        self._scope_depth -= 1
        if self._scope_depth == 0:
            self._interceptor.__exit__(None, None, None)

    def _enter_host(self, module: nn.Module, args: Any) -> None:
        intercepting = self._intercepting()
        self._frames.append((intercepting, self.records))
        if intercepting:
            self._enter_scope()

    def _exit_host(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._frames and self._frames.pop()[0]:
            self._leave_scope()

    def _enter_ancestor(self, module: nn.Module, args: Any) -> None:
        if self._forward_depth == 0:
            self.tracker.new_forward()
        self._forward_depth += 1

    def _exit_ancestor(self, module: nn.Module, args: Any, output: Any) -> None:
        self._forward_depth = max(0, self._forward_depth - 1)

    def _enter_target(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        name = self._names.get(id(module))
        if name is None:  # a deep copy of the model (an EMA copy, ...) carries copies of the hooks: not watched
            return
        if self._forward_depth == 0 and not self.running:  # called on its own, not inside the model's forward
            self.tracker.restart(name)
        layer = self.tracker.layer(name)
        self._enter_host(module, args)
        if self._frames[-1][0]:
            self.running.append(ModuleCall(module, name, layer, attention_kind(module, args, kwargs), module.training))
            self._on_start(self.running[-1], args, kwargs)

    def _exit_target(self, module: nn.Module, args: Any, output: Any) -> None:
        if id(module) not in self._names or not self._frames:
            return
        intercepted, records_before = self._frames[-1]
        if intercepted and self.running:
            call = self.running.pop()
            if not raising():
                self._on_end(call, output, self.records > records_before)
        self._exit_host(module, args, output)


def ancestors(model: nn.Module, targets: dict[str, nn.Module]) -> list[nn.Module]:
    """Modules (the model included) that contain a target without being one: their first entry
    starts a forward of the model."""
    target_ids = {id(m) for m in targets.values()}
    return [m for m in model.modules() if id(m) not in target_ids and any(id(c) in target_ids for c in m.modules())]


def in_backward() -> bool:
    """Whether the autograd engine is running (activation checkpointing recomputes forwards there)."""
    return torch._C._current_graph_task_id() != -1


def is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` or a submodule runs through ``torch.compile``: a wrapper, ``Module.compile()``,
    or a LightningModule whose steps Lightning compiled (``Trainer.fit(torch.compile(module))``)."""
    from torch._dynamo.eval_frame import OptimizedModule

    return any(
        isinstance(m, OptimizedModule) or getattr(m, "_compiled_call_impl", None) is not None or getattr(m, "_compiler_ctx", None)
        for m in model.modules()
    )


def raising() -> bool:
    """Whether a forward hook runs because the forward raised (``always_call``)."""
    return sys.exc_info()[0] is not None
