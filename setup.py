"""Declares the optional C extension shardudp._batchio; metadata is in pyproject.toml.

The extension only speeds up the data path (port_class("auto") falls back to
pure Python without it), so a missing compiler or Python headers must not fail
`pip install .`: the build step warns and carries on.
"""

from __future__ import annotations

import sys
import warnings

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """build_ext that turns any compile failure into a warning."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # no compiler at all, missing headers, ...
            self._warn(exc)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:
            self._warn(exc)

    @staticmethod
    def _warn(exc: BaseException) -> None:
        warnings.warn(
            f"shardudp._batchio was not built ({exc}); the 'c' datapath is unavailable and "
            "'auto' uses the pure Python one",
            stacklevel=1,
        )


# recvmmsg/sendmmsg are Linux interfaces.
ext_modules = (
    [
        Extension(
            "shardudp._batchio",
            ["shardudp/_batchio.c"],
            extra_compile_args=[
                "-O2",
                "-std=gnu11",
                "-Wall",
                "-Wextra",
                "-Wno-unused-parameter",
                "-Wno-missing-field-initializers",
            ],
            optional=True,
        )
    ]
    if sys.platform.startswith("linux")
    else []
)

setup(ext_modules=ext_modules, cmdclass={"build_ext": OptionalBuildExt})
