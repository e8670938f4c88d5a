"""Builds the in-target tracer (a CPython extension for the installing interpreter) and the
injection helper (a plain shared library: it uses no Python headers, so one build serves every
target version)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("hunter_attach._tracer", ["hunter_attach/_tracer.c"],
                  extra_compile_args=["-O2"], libraries=["pthread"]),
        Extension("hunter_attach.inject._helper", ["hunter_attach/inject/_helper.c"],
                  extra_compile_args=["-O2"], libraries=["pthread", "dl"]),
    ],
)
