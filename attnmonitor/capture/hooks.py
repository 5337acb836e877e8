"""Hook lifecycle of a capture: which target call is running, and the interception scope around it.

Hooks go on three kinds of modules (all removed together, idempotently, also after an exception):

- **targets**: each call becomes a :class:`~attnmonitor.capture.calls.Call` on a stack while it
  runs (innermost last), and the interceptor is active inside it;
- **fast-path hosts** (``nn.TransformerEncoder(Layer)``): the interceptor is active while they run,
  which keeps them off the eval-mode fused path that would skip their attention submodule;
- **ancestors** of the targets: their first entry marks the start of a forward of the model.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from attnmonitor.capture.calls import Call, CallTracker, attention_kind
from attnmonitor.capture.discovery import fast_path_hosts, innermost


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
        on_start: Callable[[Call, tuple[Any, ...], dict[str, Any]], None],
        on_end: Callable[[Call, Any, bool], None],
    ) -> None:
        self.model, self.targets, self.tracker = model, targets, tracker
        self._names = {id(m): (name or type(m).__name__) for name, m in targets.items()}
        self._interceptor, self._intercepting = interceptor, intercepting
        self._on_start, self._on_end = on_start, on_end
        self.running: list[Call] = []
        """Target calls running now, innermost last."""
        self.records = 0
        """Attention computations seen so far (the capture counts them)."""
        self._frames: list[tuple[bool, int]] = []  # per hooked call: (intercepted, records before)
        self._scope_depth = 0
        self._forward_depth = 0  # ancestors of targets running now
        self._handles: list[RemovableHandle] = []
        self._eager: list[nn.Module] = []

    def attach(self) -> None:
        """Register every hook (idempotent); on a compiled model, run the attention modules eagerly."""
        if self._handles:
            return
        if is_compiled(self.model):
            self._run_eagerly(innermost(self.targets).values())
        for module in self.targets.values():
            self._handles.append(module.register_forward_pre_hook(self._enter_target, with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._exit_target, always_call=True))
        for host in fast_path_hosts(self.model, self.targets):
            self._handles.append(host.register_forward_pre_hook(self._enter_host))
            self._handles.append(host.register_forward_hook(self._exit_host, always_call=True))
        for ancestor in ancestors(self.model, self.targets):
            self._handles.append(ancestor.register_forward_pre_hook(self._enter_ancestor))
            self._handles.append(ancestor.register_forward_hook(self._exit_ancestor, always_call=True))

    def remove(self) -> None:
        """Remove every hook and leave any active interception (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module in self._eager:
            del module.forward  # back to the class's forward
        self._eager.clear()
        while self._scope_depth:
            self._leave_scope()
        self.running.clear()
        self._frames.clear()
        self._forward_depth = 0

    def _run_eagerly(self, modules: Any) -> None:
        """Hooks do not run inside ``torch.compile``d graphs: run the attention modules outside them."""
        warnings.warn(
            "attnmonitor: the model is compiled with torch.compile; while the capture is attached its attention "
            "modules run eagerly (graph breaks around them) so that their attention can be intercepted.",
            RuntimeWarning,
            stacklevel=4,
        )
        for module in modules:
            if "forward" not in module.__dict__:
                module.forward = torch.compiler.disable(module.forward, recursive=False)  # type: ignore[method-assign]
                self._eager.append(module)

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
            self.running.append(Call(module, name, layer, attention_kind(module, args, kwargs), module.training))
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
    """Whether ``model`` or a submodule runs through ``torch.compile`` (wrapper or ``Module.compile()``)."""
    from torch._dynamo.eval_frame import OptimizedModule

    return any(isinstance(m, OptimizedModule) or getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())


def raising() -> bool:
    """Whether a forward hook runs because the forward raised (``always_call``)."""
    return sys.exc_info()[0] is not None
