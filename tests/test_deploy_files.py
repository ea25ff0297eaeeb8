"""The deploy files (deploy/Dockerfile, deploy/rayservice.yaml and the build context's
.dockerignore) without Docker or Kubernetes: the context sends only what `pip install` builds
fewstep from, the image's Ray is the version KubeRay is told and stays that version, and the
model volume is writable by the `ray` user of Ray's images. (The Serve config inside the manifest
is checked in test_ray_config.py.)"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
# Ray's images run as `ray`, uid 1000, whose primary group is `users`, gid 100
RAY_USER_GROUP = ("users", 100)
IMAGE = re.compile(r"rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py3(?P<python>\d{1,2})"
                   r"(?P<platform>-gpu|-cpu|-cu\d{3})?$")


# -- .dockerignore, by Docker's rules -----------------------------------------------------------

def _pattern(text: str) -> re.Pattern:
    """A .dockerignore pattern as a regex: `*` and `?` stay within one path element, `**`
    crosses any number of them (none included)."""
    out, i = "", 0
    while i < len(text):
        if text.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif text.startswith("**", i):
            out, i = out + ".*", i + 2
        elif text[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif text[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(text[i]), i + 1
    return re.compile(out)


def dockerignore_rules(text: str) -> list[tuple[bool, re.Pattern]]:
    rules = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keep = line.startswith("!")
        pattern = line[1:].strip() if keep else line
        rules.append((keep, _pattern(pattern.strip("/"))))
    return rules


def sent_to_docker(path: str, rules) -> bool:
    """Whether `path` (relative, with /) is in the build context: the last rule matching the
    path or one of its folders decides, as Docker's pattern matcher does."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    sent = True
    for keep, pattern in rules:
        if any(pattern.fullmatch(prefix) for prefix in prefixes):
            sent = keep
    return sent


def test_the_rule_reader_follows_dockers_rules():
    rules = dockerignore_rules("# comment\n*\n!src\n**/__pycache__\n!src/keep/**/__pycache__\n")
    assert not sent_to_docker("a.txt", rules) and not sent_to_docker("dir/a.txt", rules)
    assert sent_to_docker("src/a.py", rules)
    assert not sent_to_docker("src/x/__pycache__/a.pyc", rules)
    assert sent_to_docker("src/keep/y/__pycache__/a.pyc", rules)


def test_the_build_context_is_what_pip_needs_and_nothing_else():
    ignore = ROOT / ".dockerignore"
    assert ignore.is_file(), "without .dockerignore the image copies .git, .venv and outputs"
    rules = dockerignore_rules(ignore.read_text())
    needed = ["pyproject.toml", "README.md",
              *(p.relative_to(ROOT).as_posix() for p in (ROOT / "src").rglob("*")
                if p.is_file() and "__pycache__" not in p.parts
                and not any(part.endswith(".egg-info") for part in p.parts))]
    assert any(n.endswith("api_docs/static/swagger-ui-bundle.js") for n in needed)
    missing = [n for n in needed if not sent_to_docker(n, rules)]
    assert not missing, missing
    for unwanted in (".git/HEAD", ".venv/bin/python", ".venv/lib/python3.11/site-packages/x.py",
                     "src/fewstep/__pycache__/engine.cpython-311.pyc",
                     "src/fewstep.egg-info/PKG-INFO", ".pytest_cache/v/cache/nodeids",
                     "out/fewstep.png", "fewstep.png", "models/unet.safetensors",
                     "benchmarks/results/cpu.json", "tests/test_cli.py", "docs/studio.png",
                     ".whl/torch.whl", "build/lib/fewstep/engine.py", "dist/fewstep.tar.gz"):
        assert not sent_to_docker(unwanted, rules), unwanted


# -- the image and the RayService --------------------------------------------------------------

def dockerfile():
    text = (DEPLOY / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, re.M))
    (base,) = re.findall(r"^FROM\s+(\S+)", text, re.M)
    for name, value in args.items():
        base = base.replace(f"${{{name}}}", value).replace(f"${name}", value)
    return text, args, base


def rayservice():
    return yaml.safe_load((DEPLOY / "rayservice.yaml").read_text())


def pod_specs(manifest):
    cluster = manifest["spec"]["rayClusterConfig"]
    yield "head", cluster["headGroupSpec"]["template"]["spec"]
    for group in cluster["workerGroupSpecs"]:
        yield group["groupName"], group["template"]["spec"]


def test_the_image_is_a_ray_image_of_the_version_kuberay_is_told():
    text, args, base = dockerfile()
    match = IMAGE.fullmatch(base)
    assert match, f"{base!r} is not rayproject/ray:<version>-py3XX[-gpu|-cpu|-cuXXX]"
    ray_version = match["ray"]
    cluster = rayservice()["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == ray_version  # KubeRay needs the image's own Ray version
    # the image's Python is one fewstep supports, and its Ray one fewstep accepts
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        tomllib = pytest.importorskip("tomli")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    python = Version(f"3.{match['python']}")
    assert python in SpecifierSet(project["requires-python"]), python
    (ray_requirement,) = [Requirement(r) for r in project["optional-dependencies"]["ray"]]
    assert Version(ray_version) in ray_requirement.specifier
    # installing fewstep must keep that Ray: the install pins it to the image's version
    install = " ".join(line for line in text.splitlines() if "pip install" in line)
    pinned = re.search(r'"ray\[serve\]==(\$\{?RAY_VERSION\}?|[\d.]+)"', install)
    assert pinned, install
    assert pinned[1].strip("${}") in (ray_version, "RAY_VERSION")
    if "RAY_VERSION" in pinned[1]:
        assert args["RAY_VERSION"] == ray_version


def test_every_pod_can_write_the_model_volume_as_the_ray_user():
    text, _, _ = dockerfile()
    group_name, gid = RAY_USER_GROUP
    assert f"--chown=ray:{group_name}" in text  # the image's files belong to that group too
    for name, spec in pod_specs(rayservice()):
        mounts = [m for c in spec["containers"] for m in c.get("volumeMounts", [])]
        if not any(m["name"] == "models" for m in mounts):
            continue
        context = spec.get("securityContext") or {}
        assert context.get("fsGroup") == gid, f"{name}: no fsGroup {gid} for the ray user"
        # a large model volume is not re-owned file by file at every pod start
        assert context.get("fsGroupChangePolicy") == "OnRootMismatch", name
