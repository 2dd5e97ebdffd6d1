"""Typed errors. Every expected failure (bad file, bad image, bad request) is one of these, with a
one-line message that names the file or value at fault. The CLI prints ``str(err)`` and exits 1."""

from __future__ import annotations


class LegionError(Exception):
    """Base class of every error legion_rt raises on purpose."""


class ImageError(LegionError, ValueError):
    """An input picture cannot be used: unreadable, truncated, empty, too large, wrong array format."""


class ArtifactError(LegionError):
    """The artifact directory is missing, incomplete, tampered with or of an unknown format."""


class CheckpointError(LegionError):
    """A LEGION checkpoint (or CLIP / detector file) cannot be loaded safely and exactly."""


class RequestError(LegionError, ValueError):
    """A request option is out of range or inconsistent (max_new_tokens, thresholds, backend name...)."""


class UsageError(LegionError):
    """A bad command-line value (the CLI exits 2)."""


class BackendError(LegionError):
    """An inference backend cannot be created or failed while running (provider missing, TensorRT absent)."""


class BusyError(LegionError):
    """The engine is at its admission limit: ``max_concurrency`` requests run and ``max_queue`` wait (HTTP 429)."""


class DeadlineError(LegionError):
    """A request passed its ``timeout_s`` (queueing included); it was stopped and its memory freed (HTTP 504)."""
