"""Build hook for the optional C extensions (everything else is in pyproject.toml):
``evaluation._scan``, the large-k selection of ``evaluation._topk``, and ``losses._native``, the
small-batch loss kernels of ``losses.native``. ``optional=True``: where no C compiler is found
the install goes on without them and their callers take their torch / numpy paths (the same
results, slower)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "evaluation._scan",
            sources=["evaluation/_scan.c"],
            extra_compile_args=["-O3"],
            optional=True,
        ),
        Extension(
            "losses._native",
            sources=["losses/_native.c"],
            depends=["losses/_native_body.h", "losses/_native_sets.h"],
            # both flags leave every result as it is (no errno, no FP traps to keep): they let
            # the compiler vectorise the masked loops
            extra_compile_args=["-O3", "-fno-math-errno", "-fno-trapping-math"],
            optional=True,
        ),
    ]
)
