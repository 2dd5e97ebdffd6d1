"""The native build: device code in the built binary, CPU-only builds, the CUDA switch, the wheel layout."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from legion_rt import _C, ops

REPO = Path(__file__).resolve().parents[1]
FATBIN_MAGIC = 0xBA55ED50


def elf_sections(path: Path) -> dict[str, bytes]:
    """Section name -> contents of an ELF64 little-endian shared object."""
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2, f"{path} is not an ELF64 file"
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_at = headers[shstrndx][4]
    out = {}
    for name_off, _type, _flags, _addr, offset, size, *_ in headers:
        end = data.index(b"\0", names_at + name_off)
        out[data[names_at + name_off : end].decode()] = data[offset : offset + size]
    return out


def fatbin_entries(blob: bytes) -> list[tuple[str, int]]:
    """(kind, sm) of every entry of every fatbinary in a .nv_fatbin section.
    Layout: header {u32 magic, u16 version, u16 header_size, u64 payload_size}, then entries
    {u16 kind (1 = PTX, 2 = ELF/SASS), u16 version, u32 header_size, u64 payload_size, ..., u32 sm at +28}."""
    entries, off = [], 0
    while off + 16 <= len(blob):
        magic, _ver, hsize, fsize = struct.unpack_from("<IHHQ", blob, off)
        if magic != FATBIN_MAGIC:
            off += 8  # fatbinaries are 8-byte aligned inside the section
            continue
        p, end = off + hsize, off + hsize + fsize
        while p < end:
            kind, _ev, ehsize, psize = struct.unpack_from("<HHIQ", blob, p)
            (sm,) = struct.unpack_from("<I", blob, p + 28)
            entries.append(({1: "ptx", 2: "sass"}.get(kind, str(kind)), sm))
            p += ehsize + psize
        off = end
    return entries


def test_built_binary_contains_device_code_for_default_architectures():
    if not ops.cuda_compiled():
        pytest.skip("built without CUDA")
    so = Path(_C.__file__)
    sections = elf_sections(so)
    assert ".nv_fatbin" in sections, f"{so} was built with CUDA but has no .nv_fatbin section"
    entries = fatbin_entries(sections[".nv_fatbin"])
    print(f"{so.name}: fatbin entries {sorted(set(entries))}")
    sass = {sm for kind, sm in entries if kind == "sass"}
    ptx = {sm for kind, sm in entries if kind == "ptx"}
    assert {87, 90, 110} <= sass, f"missing SASS: {sorted({87, 90, 110} - sass)}"
    assert 110 in ptx, "no compute_110 PTX for newer GPUs"
    # The cubin ELF headers inside the fatbinary also name the targets (independent of the parser above).
    for sm in (87, 90, 110):
        assert f"sm_{sm}".encode() in sections[".nv_fatbin"], f"sm_{sm} not named in .nv_fatbin"


def test_static_cuda_runtime():
    if not ops.cuda_compiled():
        pytest.skip("built without CUDA")
    if shutil.which("ldd") is None:
        pytest.skip("ldd is not available")
    deps = subprocess.run(["ldd", _C.__file__], capture_output=True, text=True).stdout
    assert "libcudart" not in deps, f"the CUDA runtime must be linked statically:\n{deps}"


def _cmake_configure(build: Path, *args: str, env=None) -> subprocess.CompletedProcess:
    import pybind11

    cmd = [
        "cmake",
        "-S",
        str(REPO),
        "-B",
        str(build),
        f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
        f"-DPython_EXECUTABLE={sys.executable}",
        *args,
    ]
    if shutil.which("ninja"):
        cmd += ["-G", "Ninja"]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=170)


@pytest.mark.slow
def test_cpu_only_build_imports_and_runs(tmp_path):
    """LEGION_RT_CUDA=OFF builds a CPU-only module that imports and runs (CMake directly, ~20 s on 2 cores)."""
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")
    build = tmp_path / "build"
    cfg = _cmake_configure(build, "-DLEGION_RT_CUDA=OFF")
    assert cfg.returncode == 0, cfg.stdout + cfg.stderr
    assert "CUDA kernels: OFF" in cfg.stdout
    out = subprocess.run(
        ["cmake", "--build", str(build), "-j", "2"], capture_output=True, text=True, timeout=170
    )
    assert out.returncode == 0, out.stdout + out.stderr
    check = (
        "import sys, numpy as np; sys.path.insert(0, sys.argv[1]); import _C; "
        "assert not _C.cuda_compiled() and _C.cuda_device_count() == 0; "
        "c, s, hw = _C.preprocess(np.zeros((40, 50, 3), np.uint8)); assert hw == (819, 1024), hw; "
        "m = _C.postprocess_masks(np.ones((1, 256, 256), np.float32), hw, (40, 50)); assert m.all()"
    )
    run = subprocess.run(
        [sys.executable, "-c", check, str(build)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    so = next(build.glob("_C*.so"))
    assert ".nv_fatbin" not in elf_sections(so)


def _env_without_nvcc() -> dict:
    """The environment with a PATH that keeps cmake and this Python but hides nvcc (skips when it cannot)."""
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")
    env = dict(os.environ)
    env.pop("CUDACXX", None)
    cmake_dir = str(Path(shutil.which("cmake")).parent)
    env["PATH"] = os.pathsep.join([cmake_dir, str(Path(sys.executable).parent), "/usr/bin", "/bin"])
    if shutil.which("nvcc", path=env["PATH"]):
        pytest.skip("nvcc is installed in a system directory: cannot hide it")
    return env


@pytest.mark.slow
def test_cuda_on_without_nvcc_is_a_hard_error(tmp_path):
    env = _env_without_nvcc()
    cfg = _cmake_configure(tmp_path / "b", "-DLEGION_RT_CUDA=ON", env=env)
    assert cfg.returncode != 0
    assert "LEGION_RT_CUDA=ON but nvcc was not found on PATH" in cfg.stderr


@pytest.mark.slow
def test_cuda_auto_without_nvcc_configures_cpu_only(tmp_path):
    """AUTO (the default) on a machine without nvcc quietly builds the CPU kernels only."""
    env = _env_without_nvcc()
    cfg = _cmake_configure(tmp_path / "b", "-DLEGION_RT_CUDA=AUTO", env=env)
    assert cfg.returncode == 0, cfg.stdout + cfg.stderr
    assert "CUDA kernels: OFF" in cfg.stdout, cfg.stdout


@pytest.mark.slow
def test_wheel_maps_export_into_the_package(tmp_path):
    """`pip wheel .` (CUDA off to keep it short) holds legion_rt/_C and export/ as legion_rt/export."""
    env = dict(os.environ, LEGION_RT_CUDA="OFF")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-build-isolation",
            "--no-deps",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=170,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    wheel = next(tmp_path.glob("legion_rt-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("legion_rt/_C") and n.endswith(".so") for n in names)
    assert "legion_rt/export/__init__.py" in names
    assert "legion_rt/ops.py" in names
    assert not any(n.startswith("export/") for n in names), "export/ must only appear as legion_rt/export"


@pytest.mark.slow
def test_cuda_architectures_override(tmp_path):
    """CMAKE_CUDA_ARCHITECTURES (the standard CMake way) replaces the default list (~1 min: nvcc, one arch)."""
    if shutil.which("cmake") is None or shutil.which("nvcc") is None:
        pytest.skip("cmake or nvcc is not installed")
    build = tmp_path / "build"
    cfg = _cmake_configure(build, "-DLEGION_RT_CUDA=ON", "-DCMAKE_CUDA_ARCHITECTURES=90-real")
    assert cfg.returncode == 0, cfg.stdout + cfg.stderr
    out = subprocess.run(
        ["cmake", "--build", str(build), "-j", "2"], capture_output=True, text=True, timeout=170
    )
    assert out.returncode == 0, out.stdout + out.stderr
    so = next(build.glob("_C*.so"))
    entries = set(fatbin_entries(elf_sections(so)[".nv_fatbin"]))
    assert entries == {("sass", 90)}, entries
