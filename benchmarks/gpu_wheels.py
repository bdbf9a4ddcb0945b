"""Wheels for a GPU machine that cannot reach a package index and lacks some of crepa's dependencies.

Downloads, for the GPU machine's Python and platform, the wheels of the packages named (default: what
a stock CUDA PyTorch image lacks), at the versions installed here (so the GPU machine runs what the
CPU suite tested), the newest where one is not installed. bitsandbytes ships one library per CUDA version (43 MB in all); ``--cuda`` keeps
only that one. It ends with the requirements the wheels leave to the GPU machine's python (check that
it has them). ``gpu_check.py --wheels DIR`` installs them on the GPU machine into a folder of its own.

    python benchmarks/gpu_wheels.py [--out .whl] [--python-version 3.12] [--cuda 130] [PACKAGE ...]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from email.parser import HeaderParser
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

# lazy-importer: importlib-metadata >= 10 imports it on Python < 3.15
DEFAULT_PACKAGES = (
    "diffusers", "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions",
    "av", "ftfy", "wcwidth", "importlib-metadata", "zipp", "lazy-importer", "lazy-loader", "bitsandbytes",
)  # fmt: skip
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
)


def download(packages: list[str], out: Path, python_version: str) -> list[Path]:
    """``pip download`` of each package at the version installed here (the newest where it is not, as
    bitsandbytes on a CPU machine), no dependencies, binary only, into ``out``, where each replaces
    any other version of its project (two versions of one project stop the whole install there)."""
    pins = []
    for name in packages:
        try:
            pins.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            pins.append(name)
    platforms = [flag for platform in PLATFORMS for flag in ("--platform", platform)]
    with tempfile.TemporaryDirectory(dir=out) as staging:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
             "--python-version", python_version, *platforms, "--dest", staging, *pins],
            check=True,
        )  # fmt: skip
        fresh = sorted(Path(staging).glob("*.whl"))
        projects = {project(wheel) for wheel in fresh}
        for old in out.glob("*.whl"):
            if project(old) in projects:
                old.unlink()
        return [wheel.replace(out / wheel.name) for wheel in fresh]


def project(wheel: Path) -> str:
    """The canonical project name of a wheel file."""
    return parse_wheel_filename(wheel.name)[0]


CPU_LIBRARY = "bitsandbytes/libbitsandbytes_cpu.so"


def keep_one_cuda_library(wheel: Path, cuda: str) -> None:
    """Rewrite a bitsandbytes wheel with only ``libbitsandbytes_cuda{cuda}.so`` and the CPU library
    among its native libraries (the CPU one serves processes with CUDA hidden, as the default suite's;
    pip installs a wheel without checking its RECORD hashes)."""
    with tempfile.NamedTemporaryFile(dir=wheel.parent, suffix=".tmp", delete=False) as handle:
        stripped = Path(handle.name)
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(stripped, "w", zipfile.ZIP_DEFLATED) as target:
        libraries = [n for n in source.namelist() if n.startswith("bitsandbytes/libbitsandbytes_")]
        wanted = f"bitsandbytes/libbitsandbytes_cuda{cuda}.so"
        if wanted not in libraries:
            stripped.unlink()
            sys.exit(f"{wheel.name} has no {wanted}; it has {', '.join(sorted(libraries))}")
        for item in source.infolist():
            if item.filename in libraries and item.filename not in (wanted, CPU_LIBRARY):
                continue
            target.writestr(item, source.read(item.filename))
    stripped.replace(wheel)


def left_to_target(wheels: list[Path], python_version: str) -> list[str]:
    """The requirements of ``wheels`` (markers read for Linux and ``python_version``, no extras) that
    no wheel among them provides: the GPU machine's python must already hold these."""
    environment = {"python_version": python_version, "python_full_version": f"{python_version}.0",
                   "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix", "extra": ""}  # fmt: skip
    provided = {project(wheel) for wheel in wheels}
    needed: set[str] = set()
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
            headers = HeaderParser().parsestr(archive.read(metadata).decode())
        for line in headers.get_all("Requires-Dist") or []:
            requirement = Requirement(line)
            applies = requirement.marker is None or requirement.marker.evaluate(environment)
            if applies and canonicalize_name(requirement.name) not in provided:
                needed.add(str(requirement).partition(";")[0].strip())
    return sorted(needed, key=str.lower)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("packages", nargs="*", default=list(DEFAULT_PACKAGES))
    parser.add_argument("--out", type=Path, default=Path(".whl"))
    parser.add_argument("--python-version", default="3.12", help="the GPU machine's Python")
    parser.add_argument("--cuda", default="130", help="the GPU machine's CUDA (bitsandbytes library)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for wheel in download(args.packages, args.out, args.python_version):
        if project(wheel) == "bitsandbytes":
            keep_one_cuda_library(wheel, args.cuda)
    wheels = sorted(args.out.glob("*.whl"))
    total = sum(wheel.stat().st_size for wheel in wheels)
    print(f"{len(wheels)} wheels, {total / 2**20:.1f} MiB in {args.out}:")
    print("\n".join(f"  {wheel.name}" for wheel in wheels))
    print("left to the GPU machine's python:", ", ".join(left_to_target(wheels, args.python_version)))


if __name__ == "__main__":
    main()
