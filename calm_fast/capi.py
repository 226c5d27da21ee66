"""Where the C API lives, for stacks that call the kernels without Python.

The build places `include/calm_fast.h` and `lib/libcalm_fast.so` (every entry point of the
header: the CPU kernels, and the CUDA ones when nvcc was found) inside the installed package.

    cc app.c $(python -m calm_fast.capi --cflags --libs)

csrc/examples/capi_check.c is a complete C program against this API.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

_PKG = Path(__file__).resolve().parent


def include_dir() -> Path:
    """The directory holding calm_fast.h."""
    return _existing(_PKG / "include", "calm_fast.h")


def library_path() -> Path:
    """libcalm_fast.so, the C API as one shared library."""
    return _existing(_PKG / "lib", "libcalm_fast.so") / "libcalm_fast.so"


def cflags() -> list[str]:
    return [f"-I{include_dir()}"]


def libs() -> list[str]:
    """Link flags: the library, and an rpath so the program finds it where the package is."""
    lib = library_path().parent
    return [f"-L{lib}", f"-Wl,-rpath,{lib}", "-lcalm_fast"]


def _existing(directory: Path, name: str) -> Path:
    if not (directory / name).is_file():
        raise FileNotFoundError(
            f"{directory / name} is missing: the native build places it there "
            f"(pip install --no-build-isolation -e . or python setup.py build_ext --inplace)")
    return directory


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m calm_fast.capi", description=__doc__.splitlines()[0])
    ap.add_argument("--cflags", action="store_true", help="compiler flags (the include directory)")
    ap.add_argument("--libs", action="store_true", help="linker flags for libcalm_fast")
    args = ap.parse_args(argv)
    try:
        if args.cflags or args.libs:
            print(" ".join((cflags() if args.cflags else []) + (libs() if args.libs else [])))
        else:  # no option: say where the two files are
            print(include_dir() / "calm_fast.h")
            print(library_path())
    except FileNotFoundError as e:
        print(f"calm_fast.capi: error: {e}", file=sys.stderr)
        return 2
    return 0

if __name__ == "__main__":
    sys.exit(main())
