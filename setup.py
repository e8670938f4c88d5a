"""Builds the in-target tracer (a CPython extension for the installing interpreter), the
injection helper (a plain shared library: it uses no Python headers, so one build serves every
target version) and the CLI's fast decoder (hunter_attach/_speedups.c, optional: without it the
CLI uses fastpath.PySink)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("hunter_attach._tracer", ["hunter_attach/_tracer.c"],
                  extra_compile_args=["-O2"], libraries=["pthread"]),
        Extension("hunter_attach.inject._helper", ["hunter_attach/inject/_helper.c"],
                  extra_compile_args=["-O2"], libraries=["pthread", "dl"]),
        Extension("hunter_attach._speedups", ["hunter_attach/_speedups.c"],
                  extra_compile_args=["-O2"], optional=True),
    ],
)
