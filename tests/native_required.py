"""The native extension for the test modules that exercise it: skipped where it is not built,
except under CI (``CI`` or ``RELEX_REQUIRE_NATIVE`` set), where a missing extension is a failure."""

from __future__ import annotations

import os

import pytest


def native_or_skip_module():
    """:mod:`relex_kernels.ops.native` with its extension built, else skip the calling module."""
    native = pytest.importorskip("relex_kernels.ops.native")
    ok, why = native.available()
    if not ok:
        if os.environ.get("CI") or os.environ.get("RELEX_REQUIRE_NATIVE"):
            raise RuntimeError(f"the native CPU extension must be built in CI: {why}")
        pytest.skip(f"native kernels not built: {why}", allow_module_level=True)
    return native
