"""Declarative backend registry and dispatch, shared by every fused op.

Each backend states what it cannot run through ``unsupported(request) -> list[str]`` (empty: it can).
Dispatch walks a per-device priority list (a ``"<device>+<feature>"`` entry, when the request has
that feature, replaces the device's list); ``impl=`` or the ``FASTXMC_IMPL`` environment variable
forces one backend, which then either runs or raises an error listing why it cannot. The automatic
choice never raises while any backend fits: when a preferred backend is skipped it falls back with
one warning per (op, reason) so a missing build does not go unnoticed.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

IMPL_ENV = "FASTXMC_IMPL"


@dataclass(frozen=True)
class Request:
    """What a call needs from a backend: where the data lives and which features it uses."""

    device: torch.device
    dtype: torch.dtype
    features: frozenset = frozenset()


@dataclass(frozen=True)
class Backend:
    name: str
    unsupported: Callable[[Request], list]
    description: str = ""


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run the given inputs (the message lists why)."""


@dataclass
class OpRegistry:
    op: str
    priority: dict  # device type (or "type+feature") -> ordered backend names; "default" otherwise
    backends: dict = field(default_factory=dict)
    _warned: set = field(default_factory=set)

    def register(self, backend: Backend) -> None:
        self.backends[backend.name] = backend

    def names(self) -> list:
        return list(self.backends)

    def reasons(self, request: Request) -> dict:
        """Backend name -> reasons it cannot run ``request`` (empty list: it can)."""
        return {name: list(b.unsupported(request)) for name, b in self.backends.items()}

    def select(self, request: Request, impl: str | None = None) -> str:
        forced = impl if impl is not None else os.environ.get(IMPL_ENV) or None
        if forced is not None:
            return self._forced(forced, request, from_env=impl is None)
        return self._automatic(request)

    def _forced(self, name: str, request: Request, from_env: bool) -> str:
        source = f"{IMPL_ENV}={name!r}" if from_env else f"impl={name!r}"
        if name not in self.backends:
            raise ValueError(f"{self.op}: unknown backend {source}; expected one of {self.names()}")
        why = self.backends[name].unsupported(request)
        if why:
            raise BackendUnavailableError(
                f"{self.op}: backend {source} cannot run on {request.device.type} "
                f"{request.dtype} inputs: " + "; ".join(why))
        return name

    def order(self, request: Request) -> list:
        """The backends the automatic choice tries, in order."""
        device = request.device.type
        for feature in sorted(request.features):
            if f"{device}+{feature}" in self.priority:
                return self.priority[f"{device}+{feature}"]
        return self.priority.get(device, self.priority["default"])

    def _automatic(self, request: Request) -> str:
        order = self.order(request)
        skipped = []
        for name in order:
            why = self.backends[name].unsupported(request)
            if not why:
                if skipped:
                    self._warn_once(name, skipped)
                return name
            skipped.append((name, why))
        details = "; ".join(f"{n}: {', '.join(w)}" for n, w in self.reasons(request).items() if w)
        raise BackendUnavailableError(f"{self.op}: no backend can run these inputs ({details})")

    def _warn_once(self, chosen: str, skipped: list) -> None:
        key = (chosen, tuple((n, tuple(w)) for n, w in skipped))
        if key in self._warned:
            return
        self._warned.add(key)
        why = "; ".join(f"{n} ({', '.join(w)})" for n, w in skipped)
        warnings.warn(f"fastxmc {self.op}: falling back to the {chosen!r} backend because {why}",
                      RuntimeWarning, stacklevel=4)
