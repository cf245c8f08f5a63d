"""make image: build the CPU serving image and the repository image with podman, here,
with no registry.

    python -m deploy.images [--repo model_repository] [--base IMAGE] [--tag latest]

- localhost/captioner-server-cpu from deploy/Dockerfile.cpu;
- localhost/captioner-repository from deploy/Dockerfile.repository and a built CPU
  repository (`make build-engines TARGET=cpu`).

Without --base (BASE= in make) the serving image's base is made from Debian's archive:
`debootstrap --variant=minbase bookworm` with Python 3.11 (what python:3.11-slim-bookworm
holds), imported with `podman import`, and the repository image's base is Debian's static
busybox on an empty image. Both bases are cached as local images (--rebuild-base makes
them again). With --base, the Dockerfiles' own bases (a registry) are used unless named.
podman, buildah, runc and debootstrap are installed with apt-get when missing (root).
pip inside the build reaches PyPI with this machine's CA bundle, passed as a build secret
(never stored in the image).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from deploy.containers import (
    REPOSITORY_IMAGE,
    ROOT,
    SERVER_IMAGE,
    ContainerError,
    build_manifest,
    image_exists,
    podman,
    shm_bytes,
    ulimits,
)

TOOLS = {"podman": "podman", "buildah": "buildah", "runc": "runc", "debootstrap": "debootstrap"}
SUITE = "bookworm"
BASE_IMAGE = f"localhost/captioner-base:{SUITE}"
BUSYBOX_IMAGE = f"localhost/captioner-busybox:{SUITE}"
# What python:3.11-slim-bookworm provides and the serving image relies on: the
# interpreter the venv is made from, venv itself, the shared libpython the Python
# backend's 3.11 stub links against, and the CA certificates. debootstrap does not
# resolve virtual packages: python3-distutils provides venv's python3.11-distutils.
BASE_PACKAGES = ("python3.11", "python3.11-venv", "python3-distutils", "libpython3.11", "ca-certificates")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
PATH_ENV = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CA_BUNDLES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt")


def say(msg: str) -> None:
    print(f"make image: {msg}", flush=True)


def ensure_tools() -> None:
    missing = [pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None]
    if not missing:
        return
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        raise ContainerError(f"missing {', '.join(missing)}: install them (apt-get install {' '.join(missing)}, as root)")
    say(f"installing {', '.join(missing)} with apt-get (missing here)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing], check=True, env=env)


def sources(mirror: str) -> str:
    """Debian's deb822 sources for the image: the release, its updates and security."""
    security = (
        mirror.replace("/debian", "/debian-security") if mirror.endswith("/debian") else "http://deb.debian.org/debian-security"
    )
    return (
        f"Types: deb\nURIs: {mirror}\nSuites: {SUITE} {SUITE}-updates\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
        f"Types: deb\nURIs: {security}\nSuites: {SUITE}-security\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
    )


def make_base(mirror: str) -> None:
    """debootstrap minbase + Python 3.11 -> `podman import` as BASE_IMAGE."""
    if os.geteuid() != 0:
        raise ContainerError("debootstrap needs root; or give a base image with BASE=")
    with tempfile.TemporaryDirectory(prefix="captioner-base-", dir="/var/tmp") as tmp:
        rootfs = Path(tmp) / "rootfs"
        say(
            f"making the base image {BASE_IMAGE}: debootstrap --variant=minbase {SUITE} "
            f"(+ {', '.join(BASE_PACKAGES)}) from {mirror}"
        )
        subprocess.run(
            ["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", SUITE, str(rootfs), mirror],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        (rootfs / "etc/apt/sources.list").unlink(missing_ok=True)
        (rootfs / "etc/apt/sources.list.d/debian.sources").write_text(sources(mirror))
        for d in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for p in (rootfs / d).glob("*"):
                if p.is_file():
                    p.unlink()
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE)
        assert tar.stdout is not None  # stdout=PIPE
        subprocess.run(
            podman()
            + [
                "import",
                "--change",
                f"ENV PATH={PATH_ENV}",
                "--change",
                "ENV LANG=C.UTF-8",
                "--change",
                'CMD ["/bin/bash"]',
                "-",
                BASE_IMAGE,
            ],
            stdin=tar.stdout,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        tar.stdout.close()
        if tar.wait() != 0:
            raise ContainerError("tar of the debootstrap tree failed")


BUSYBOX_CONTAINERFILE = f"""\
FROM {BASE_IMAGE} AS debian
RUN apt-get update -q && apt-get install -y -q --no-install-recommends busybox-static
FROM scratch
COPY --from=debian /bin/busybox /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]
"""


def make_busybox() -> None:
    """Debian's static busybox alone (cp for the init container, sh and sleep for a
    modelcar), as busybox:1.36 would give them."""
    say(f"making the repository image's base {BUSYBOX_IMAGE} (Debian's busybox-static)")
    with tempfile.TemporaryDirectory(prefix="captioner-busybox-") as tmp:
        (Path(tmp) / "Containerfile").write_text(BUSYBOX_CONTAINERFILE)
        subprocess.run(podman() + ["build", "--network", "host", *ulimits(), "-t", BUSYBOX_IMAGE, tmp], check=True)


def ca_bundle() -> str | None:
    for path in (os.environ.get("PIP_CERT"), *CA_BUNDLES):
        if path and Path(path).is_file():
            return path
    return None


def build(dockerfile: str, tag: str, build_args: dict[str, str], secrets: dict[str, str]) -> None:
    cmd = podman() + ["build", "--format", "docker", "--network", "host", *ulimits(), "-f", f"deploy/{dockerfile}", "-t", tag]
    for k, v in build_args.items():
        cmd += ["--build-arg", f"{k}={v}"]
    for k, v in secrets.items():
        cmd += ["--secret", f"id={k},src={v}"]
    say("$ " + " ".join(cmd + ["."]))
    subprocess.run(cmd + ["."], check=True, cwd=ROOT)


def check_repository(repo: Path) -> None:
    manifest = build_manifest(repo)
    if manifest.get("target") != "cpu":
        raise ContainerError(
            f"{repo} was built for {manifest.get('target')}, the CPU image serves a CPU repository: make build-engines TARGET=cpu"
        )
    shm_bytes(repo)  # the run lines and manifests need it
    if ROOT not in repo.resolve().parents:
        raise ContainerError(f"{repo} must lie inside the build context {ROOT}")


def sizes(images: list[str]) -> str:
    return "\n".join(
        subprocess.run(
            podman() + ["images", "--format", "{{.Repository}}:{{.Tag}}  {{.Size}}", image],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for image in images
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deploy.images", description=__doc__.splitlines()[0])
    p.add_argument("--repo", type=Path, default=ROOT / "model_repository", help="a built CPU repository")
    p.add_argument(
        "--base",
        default=os.environ.get("BASE") or None,
        help="the serving image's base (a registry's python:3.11-slim-bookworm); default: made here with debootstrap [$BASE]",
    )
    p.add_argument(
        "--repo-base",
        default=os.environ.get("REPO_BASE") or None,
        help="the repository image's base; default: Debian's static busybox without --base, "
        "the Dockerfile's busybox:1.36 with it [$REPO_BASE]",
    )
    p.add_argument("--tag", default="latest")
    p.add_argument("--mirror", default=os.environ.get("DEBIAN_MIRROR") or DEFAULT_MIRROR, help="[$DEBIAN_MIRROR]")
    p.add_argument("--rebuild-base", action="store_true", help="make the cached Debian bases again")
    a = p.parse_args(argv)
    try:
        ensure_tools()
        repo = a.repo.resolve()
        check_repository(repo)
        server_args, repo_args = {}, {"REPO": str(repo.relative_to(ROOT))}
        if a.base:
            server_args["BASE"] = a.base
        else:
            if a.rebuild_base or not image_exists(BASE_IMAGE):
                make_base(a.mirror)
            else:
                say(f"base image {BASE_IMAGE} is cached (--rebuild-base makes it again)")
            server_args["BASE"] = BASE_IMAGE
        if a.repo_base:
            repo_args["BASE"] = a.repo_base
        elif not a.base:
            if a.rebuild_base or not image_exists(BUSYBOX_IMAGE):
                make_busybox()
            repo_args["BASE"] = BUSYBOX_IMAGE
        cert = ca_bundle()
        secrets = {"pip_cert": cert} if cert else {}
        build("Dockerfile.cpu", f"{SERVER_IMAGE}:{a.tag}", server_args, secrets)
        build("Dockerfile.repository", f"{REPOSITORY_IMAGE}:{a.tag}", repo_args, {})
    except (ContainerError, subprocess.CalledProcessError) as e:
        print(f"make image: error: {e}", file=sys.stderr)
        return 1
    say("built:\n" + sizes([f"{SERVER_IMAGE}:{a.tag}", f"{REPOSITORY_IMAGE}:{a.tag}"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
