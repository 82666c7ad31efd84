"""Build hook for the optional C extension ``evaluation._scan`` (everything else is in
pyproject.toml). ``optional=True``: where no C compiler is found the install goes on without it
and ``evaluation._topk`` uses its numpy path (same results, slower at large k)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "evaluation._scan",
            sources=["evaluation/_scan.c"],
            extra_compile_args=["-O3"],
            optional=True,
        )
    ]
)
