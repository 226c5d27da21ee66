"""Builds calm_fast's native extensions by driving CMake (CMakeLists.txt is the one build
description). Project metadata lives in pyproject.toml; this file only adds the extensions.

    pip install --no-build-isolation -e .        # or
    python setup.py build_ext --inplace

Environment: CALM_FAST_CUDA=AUTO|ON|OFF (default AUTO: build calm_fast._C_cuda when nvcc is
found), CALM_FAST_SANITIZE=1, CALM_FAST_NATIVE=1, CMAKE_BUILD_PARALLEL_LEVEL (default 2),
CMAKE_ARGS (extra -D options), CMAKE_CUDA_ARCHITECTURES (default "80;90").
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
C_LIBRARY, C_HEADER = "lib/libcalm_fast.so", "include/calm_fast.h"  # inside the package


def _find_nvcc() -> str | None:
    for cand in (os.environ.get("CUDACXX"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and Path(cand).is_file():
            return cand
    return None


def _cmake() -> str:
    """The cmake of the `cmake` Python package when installed (pinned), else the one on PATH."""
    try:
        import cmake
        cand = Path(cmake.CMAKE_BIN_DIR) / "cmake"
        if cand.is_file():
            return str(cand)
    except (ImportError, AttributeError):
        pass
    found = shutil.which("cmake")
    if found is None:
        raise SystemExit("cmake not found: pip install cmake (or put cmake on PATH)")
    return found


def _want_cuda() -> bool:
    mode = os.environ.get("CALM_FAST_CUDA", "AUTO").upper()
    if mode not in ("AUTO", "ON", "OFF"):
        raise SystemExit(f"CALM_FAST_CUDA must be AUTO, ON or OFF, got {mode!r}")
    if mode == "ON" and _find_nvcc() is None:
        raise SystemExit("CALM_FAST_CUDA=ON but nvcc was not found (set CUDACXX)")
    return mode == "ON" or (mode == "AUTO" and _find_nvcc() is not None)


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configure and build every target once, then place each module where setuptools wants it."""

    _built: Path | None = None

    def _cmake_build(self) -> Path:
        if self._built is not None:
            return self._built
        build_dir = Path(self.build_temp).resolve() / "cmake"
        out_dir = build_dir / "modules"
        build_dir.mkdir(parents=True, exist_ok=True)
        pybind11_dir = subprocess.check_output([sys.executable, "-m", "pybind11", "--cmakedir"],
                                               text=True).strip()
        cuda = _want_cuda()
        args = [
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11_dir}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DCMAKE_BUILD_TYPE={'Debug' if self.debug else 'Release'}",
            f"-DCALM_FAST_CUDA={'ON' if cuda else 'OFF'}",
            "-DCALM_FAST_CAPI_LIB=ON", "-DCALM_FAST_PYTHON=ON",  # the package ships both
            f"-DCALM_FAST_SANITIZE={'ON' if os.environ.get('CALM_FAST_SANITIZE') == '1' else 'OFF'}",
            f"-DCALM_FAST_NATIVE={'ON' if os.environ.get('CALM_FAST_NATIVE') == '1' else 'OFF'}",
        ]
        if cuda:
            args.append(f"-DCMAKE_CUDA_COMPILER={_find_nvcc()}")
            args.append(f"-DCMAKE_CUDA_ARCHITECTURES={os.environ.get('CMAKE_CUDA_ARCHITECTURES', '80;90')}")
        args += os.environ.get("CMAKE_ARGS", "").split()
        env = dict(os.environ)
        env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", "2")
        cmake = _cmake()
        subprocess.check_call([cmake, "-S", str(ROOT), "-B", str(build_dir), *args], env=env)
        subprocess.check_call([cmake, "--build", str(build_dir)], env=env)
        self._built = out_dir
        return out_dir

    def build_extension(self, ext: Extension) -> None:
        out_dir = self._cmake_build()
        leaf = ext.name.rsplit(".", 1)[-1]
        built = [p for p in out_dir.iterdir() if p.name.split(".", 1)[0] == leaf]
        if len(built) != 1:
            raise RuntimeError(f"CMake did not produce exactly one {leaf} module in {out_dir}: {built}")
        dest = Path(self.get_ext_fullpath(ext.name))
        _place(built[0], dest)
        if ext.name == "calm_fast._C":  # the C API for other stacks (calm_fast/capi.py finds it)
            if not (out_dir / "libcalm_fast.so").is_file():
                raise RuntimeError("CMake did not build libcalm_fast.so, which the package ships "
                                   "(is CALM_FAST_CAPI_LIB=OFF in CMAKE_ARGS?)")
            _place(out_dir / "libcalm_fast.so", dest.parent / C_LIBRARY)
            _place(ROOT / "csrc" / "calm_fast.h", dest.parent / C_HEADER)

    def copy_extensions_to_source(self) -> None:
        """--inplace and editable installs: the C API files go beside the modules too."""
        super().copy_extensions_to_source()
        package_dir = Path(self.get_finalized_command("build_py").get_package_dir("calm_fast"))
        for rel in (C_LIBRARY, C_HEADER):
            _place(Path(self.build_lib) / "calm_fast" / rel, package_dir / rel)


def _place(src: Path, dest: Path) -> None:
    """Copy then rename: overwriting a loaded .so in place would crash running processes."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dest)


extensions = [CMakeExtension("calm_fast._C")]
if _want_cuda():
    extensions.append(CMakeExtension("calm_fast._C_cuda"))

setup(ext_modules=extensions, cmdclass={"build_ext": CMakeBuild})
