"""The native build: device code in the built binary, CPU-only builds, the CUDA switch, the wheel layout."""

from __future__ import annotations

import json
import os
import re
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


def _nvcc_release(nvcc: str | None = None) -> tuple[int, int] | None:
    """(major, minor) of `nvcc --version` ("... release 13.0, V13.0.88"), None without an nvcc."""
    nvcc = nvcc or shutil.which("nvcc")
    if nvcc is None:
        return None
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _device_code(so: Path) -> tuple[set[int], set[int]]:
    """(SASS architectures, PTX architectures) in the .nv_fatbin section of a built module."""
    sections = elf_sections(so)
    assert ".nv_fatbin" in sections, f"{so} was built with CUDA but has no .nv_fatbin section"
    entries = fatbin_entries(sections[".nv_fatbin"])
    print(f"{so.name}: fatbin entries {sorted(set(entries))}")
    return {sm for kind, sm in entries if kind == "sass"}, {sm for kind, sm in entries if kind == "ptx"}


def test_built_binary_contains_device_code_for_default_architectures():
    """Default list: SASS for 87 (Orin), 90 (Hopper) and, with CUDA >= 13, 110 (Thor); PTX of compute_80 only,
    which every GPU of compute capability >= 8.0 can JIT (A100, RTX 30/40/50, ...)."""
    if not ops.cuda_compiled():
        pytest.skip("built without CUDA")
    so = Path(_C.__file__)
    sass, ptx = _device_code(so)
    release = _nvcc_release()
    want_sass = {87, 90, 110} if release is None or release >= (13, 0) else {87, 90}
    assert want_sass <= sass, f"missing SASS: {sorted(want_sass - sass)} (nvcc release {release})"
    assert ptx == {80}, f"PTX must be compute_80 alone (JIT on every GPU >= sm_80), got {sorted(ptx)}"
    # The cubin ELF headers inside the fatbinary also name the targets (independent of the parser above).
    blob = elf_sections(so)[".nv_fatbin"]
    for sm in sorted(want_sass):
        assert f"sm_{sm}".encode() in blob, f"sm_{sm} not named in .nv_fatbin"


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


# --------------------------------------------------------------------------------------------------------
# CUDA 12 (JetPack 6 ships CUDA 12.6). No CUDA 12 nvcc can be installed here: the PyPI wheels
# nvidia-cuda-nvcc-cu12 (12.0 ... 12.9) carry ptxas, libnvvm and headers but neither the nvcc driver nor cicc,
# and Debian's main archive has no CUDA toolkit. The tests below therefore use a stand-in that behaves like
# CUDA 12.6's nvcc where the build depends on it: `nvcc --version` prints 12.6's banner, and any GPU
# architecture that 12.6 does not know (110 and the other Blackwell numbers) is rejected with 12.6's message;
# every other call is handed to the installed nvcc, which does the real compiling.
CUDA126_ARCHS = {50, 52, 53, 60, 61, 62, 70, 72, 75, 80, 86, 87, 89, 90}
CUDA126_NVCC = """#!{python}
import os, re, sys
args = sys.argv[1:]
if "--version" in args or "-V" in args:
    print("nvcc: NVIDIA (R) Cuda compiler driver")
    print("Copyright (c) 2005-2024 NVIDIA Corporation")
    print("Built on Tue_Oct_29_23:50:19_PDT_2024")
    print("Cuda compilation tools, release 12.6, V12.6.85")
    print("Build cuda_12.6.r12.6/compiler.35059454_0")
    sys.exit(0)
for arch in re.findall(r"(?:compute|sm|lto)_(\\d+)", " ".join(args)):
    if int(arch) not in {known}:
        print(f"nvcc fatal   : Unsupported gpu architecture 'compute_{{arch}}'", file=sys.stderr)
        sys.exit(1)
os.execv({nvcc!r}, [{nvcc!r}, *args])
"""


def _cuda126_env(tmp_path: Path) -> dict:
    """Environment whose CUDA compiler (CUDACXX) is the CUDA 12.6 stand-in (skips without cmake / nvcc)."""
    nvcc = shutil.which("nvcc")
    if shutil.which("cmake") is None or nvcc is None:
        pytest.skip("cmake or nvcc is not installed (the CUDA 12.6 stand-in delegates compiling to nvcc)")
    fake = tmp_path / "cuda-12.6" / "bin" / "nvcc"
    fake.parent.mkdir(parents=True)
    fake.write_text(
        CUDA126_NVCC.format(
            python=sys.executable, known=sorted(CUDA126_ARCHS), nvcc=str(Path(nvcc).resolve())
        )
    )
    fake.chmod(0o755)
    assert "release 12.6" in subprocess.run([fake, "--version"], capture_output=True, text=True).stdout
    env = dict(os.environ, CUDACXX=str(fake))
    env.pop("CUDAARCHS", None)
    return env


def _one_line(text: str) -> str:
    """CMake wraps and indents messages: join them back into single-space text."""
    return " ".join(text.split())


@pytest.mark.slow
def test_cuda12_auto_builds_with_the_cuda12_default_architectures(tmp_path):
    """JetPack 6 (CUDA 12.6): AUTO picks 87;90 + compute_80 PTX (no 110, which CUDA 12 rejects) and the
    CUDA build succeeds (~25 s: configure and build with nvcc). Before the fix the configure failed outright."""
    env = _cuda126_env(tmp_path)
    build = tmp_path / "build"
    cfg = _cmake_configure(build, "-DLEGION_RT_CUDA=AUTO", env=env)
    assert cfg.returncode == 0, cfg.stdout + cfg.stderr
    assert "(CUDA 12.6), CUDA architectures 87-real;90-real;80-virtual (default for CUDA 12.6)" in cfg.stdout
    assert "CUDA kernels: ON" in cfg.stdout, cfg.stdout
    out = subprocess.run(
        ["cmake", "--build", str(build), "-j", "2"], capture_output=True, text=True, env=env, timeout=170
    )
    assert out.returncode == 0, out.stdout + out.stderr
    sass, ptx = _device_code(next(build.glob("_C*.so")))
    assert (sass, ptx) == ({87, 90}, {80})


@pytest.mark.slow
def test_cuda12_auto_with_an_unsupported_list_falls_back_to_cpu(tmp_path):
    """AUTO keeps its promise when nvcc rejects the architecture list: CPU kernels, and a status line saying why."""
    env = _cuda126_env(tmp_path)
    cfg = _cmake_configure(
        tmp_path / "b", "-DLEGION_RT_CUDA=AUTO", "-DCMAKE_CUDA_ARCHITECTURES=110-real", env=env
    )
    assert cfg.returncode == 0, cfg.stdout + cfg.stderr
    assert "CUDA kernels: OFF" in cfg.stdout, cfg.stdout
    status = next(line for line in cfg.stdout.splitlines() if "building the CPU kernels only" in line)
    assert "(CUDA 12.6) cannot compile for CUDA architectures '110-real'" in status, status
    assert "Unsupported gpu architecture 'compute_110'" in status, status


@pytest.mark.slow
def test_cuda12_on_with_an_unsupported_list_is_one_clear_error(tmp_path):
    env = _cuda126_env(tmp_path)
    cfg = _cmake_configure(
        tmp_path / "b", "-DLEGION_RT_CUDA=ON", "-DCMAKE_CUDA_ARCHITECTURES=110-real", env=env
    )
    assert cfg.returncode != 0
    err = _one_line(cfg.stderr)
    assert err.count("CMake Error") == 1, cfg.stderr
    assert "LEGION_RT_CUDA=ON but nvcc" in err and "(CUDA 12.6) cannot compile for CUDA architectures" in err
    assert "Unsupported gpu architecture 'compute_110'" in err, err
    assert "110 needs CUDA >= 13" in err, err
    assert "will not be able to correctly generate" not in err, "enable_language(CUDA) must not be reached"


def _env_with_nvcc() -> dict:
    if shutil.which("cmake") is None or shutil.which("nvcc") is None:
        pytest.skip("cmake or nvcc is not installed")
    env = dict(os.environ)
    env.pop("CUDAARCHS", None)
    return env


@pytest.mark.slow
def test_cuda_on_with_an_architecture_nvcc_does_not_know_is_one_clear_error(tmp_path):
    """Same with the installed nvcc and a list no toolkit supports: ON fails once, naming nvcc's own error;
    AUTO builds the CPU kernels."""
    env = _env_with_nvcc()
    on = _cmake_configure(
        tmp_path / "on", "-DLEGION_RT_CUDA=ON", "-DCMAKE_CUDA_ARCHITECTURES=99-real", env=env
    )
    assert on.returncode != 0
    err = _one_line(on.stderr)
    assert err.count("CMake Error") == 1, on.stderr
    assert "cannot compile for CUDA architectures '99-real': nvcc fatal : Unsupported gpu architecture" in err
    assert "will not be able to correctly generate" not in err
    auto = _cmake_configure(
        tmp_path / "auto", "-DLEGION_RT_CUDA=AUTO", "-DCMAKE_CUDA_ARCHITECTURES=99-real", env=env
    )
    assert auto.returncode == 0, auto.stdout + auto.stderr
    assert "CUDA kernels: OFF" in auto.stdout


@pytest.mark.slow
def test_architectures_below_sm80_are_refused_by_name(tmp_path):
    """The kernels use sm_80 warp reductions: a list with 75 (or Xavier's 72) falls back under AUTO and is a
    clear error under ON, instead of a compile error deep in the build."""
    env = _env_with_nvcc()
    auto = _cmake_configure(
        tmp_path / "a", "-DLEGION_RT_CUDA=AUTO", "-DCMAKE_CUDA_ARCHITECTURES=75-real;90-real", env=env
    )
    assert auto.returncode == 0, auto.stdout + auto.stderr
    assert "CUDA kernels: OFF" in auto.stdout
    assert "the kernels need compute capability >= 8.0, the list has 75-real" in auto.stdout
    on = _cmake_configure(tmp_path / "o", "-DLEGION_RT_CUDA=ON", "-DCMAKE_CUDA_ARCHITECTURES=72", env=env)
    assert on.returncode != 0
    assert "the kernels need compute capability >= 8.0, the list has 72" in _one_line(on.stderr)


# --------------------------------------------------------------------------------------------------------
# Packaging: one version string, build outputs kept out of the sources.


def test_one_version_string():
    """The version is written once (legion_rt/__init__.py); pyproject reads it from there at build time."""
    import importlib.metadata

    import legion_rt

    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    provider = project["tool"]["scikit-build"]["metadata"]["version"]
    assert provider == {"provider": "scikit_build_core.metadata.regex", "input": "legion_rt/__init__.py"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", legion_rt.__version__)
    # The installed distribution (make install: this checkout, editable) carries the same string.
    assert importlib.metadata.version("legion_rt") == legion_rt.__version__


def _source_files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink()}


@pytest.mark.slow
def test_editable_install_keeps_build_outputs_out_of_the_sources(tmp_path):
    """An editable install (the PEP 660 hook `pip install -e` calls; CUDA off to keep it short, ~30 s) writes
    nothing beside the sources but build/: CMake's files and the compiled _C stay there and in the wheel. The
    wheel's import hook serves legion_rt from legion_rt/ and legion_rt.export from export/ (as in a wheel)."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout (to copy exactly the source files)")
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, timeout=60
    )
    assert listed.returncode == 0, listed.stderr
    src = tmp_path / "src"
    for name in filter(None, listed.stdout.decode().split("\0")):
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    before = _source_files(src)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    build = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, scikit_build_core.build as b; print(b.build_editable(sys.argv[1]))",
            str(wheels),
        ],
        cwd=src,
        capture_output=True,
        text=True,
        env=dict(os.environ, LEGION_RT_CUDA="OFF"),
        timeout=300,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    new = sorted(_source_files(src) - before)
    assert new, "the build wrote nothing at all"
    outside = [n for n in new if not n.startswith("build/")]
    assert outside == [], f"build outputs outside build/: {outside[:20]}"
    assert not list((src / "legion_rt").glob("_C*")), "_C must not be built into the source folder"

    # Install the editable wheel into a fresh site directory and import from elsewhere (not the checkout).
    site_dir = tmp_path / "site"
    wheel = next(wheels.glob("legion_rt-*.whl"))
    zipfile.ZipFile(wheel).extractall(site_dir)
    metadata = next(site_dir.glob("legion_rt-*.dist-info")) / "METADATA"
    version = re.search(r"^Version: (.+)$", metadata.read_text(), re.M).group(1)
    check = (
        "import json, site, sys; site.addsitedir(sys.argv[1]); sys.path.extend(sys.argv[2].split('\\n'));"
        "import legion_rt, legion_rt._C, legion_rt.export, legion_rt.export.config;"
        "print(json.dumps([legion_rt.__file__, legion_rt._C.__file__, legion_rt.export.__file__,"
        " legion_rt.export.config.__file__, legion_rt.__version__, legion_rt._C.cuda_compiled()]))"
    )
    run = subprocess.run(
        [sys.executable, "-S", "-c", check, str(site_dir), "\n".join(p for p in sys.path if p)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    pkg, so, exp, cfg, got_version, cuda = json.loads(run.stdout.strip().splitlines()[-1])
    assert Path(pkg) == src / "legion_rt" / "__init__.py"
    assert Path(so).parent == site_dir / "legion_rt" and not cuda
    assert Path(exp) == src / "export" / "__init__.py"
    assert Path(cfg) == src / "export" / "config.py"
    assert got_version == version
