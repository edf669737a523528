"""What a user installs (issue 17, items 2, 3 and 5).

The distribution is ``memkit-video`` (``memkit`` on PyPI is another project) with an
Apache-2.0 licence file, one version (``memkit.__version__``), extras that hold what the
tests import, and a wheel and an sdist that build: the installed wheel loads its bundled
demo checkpoints, and the unpacked sdist runs its own tests.
"""

import ast
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

import memkit

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
DIST = "memkit-video"


def _normalise(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _requirement_name(requirement: str) -> str:
    for sep in "<>=!~[; ":
        requirement = requirement.split(sep)[0]
    return _normalise(requirement)


def test_distribution_name_licence_and_single_version() -> None:
    assert PROJECT["name"] == DIST
    assert PROJECT["license"] == "Apache-2.0" and PROJECT["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    assert PROJECT["authors"] and PROJECT["classifiers"]
    assert not any(c.startswith("License ::") for c in PROJECT["classifiers"])  # the SPDX expression says it
    assert "version" not in PROJECT and PROJECT["dynamic"] == ["version"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "memkit.__version__"}
    try:
        installed = importlib.metadata.version(DIST)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{DIST} is not installed in this environment (running from a source tree)")
    assert installed == memkit.__version__


def test_readme_and_docs_install_the_right_distribution() -> None:
    for page in (ROOT / "README.md", ROOT / "docs" / "index.md"):
        text = page.read_text()
        assert f"pip install {DIST}" in text, page
        assert "pip install memkit\n" not in text and "pip install memkit`" not in text, page
    for path in [*ROOT.joinpath("docs").rglob("*.md"), *ROOT.joinpath("memkit").rglob("*.py"), ROOT / "README.md"]:
        text = path.read_text()
        for extra in ("video", "dev", "diffusers", "docs", "xformers"):
            assert f"'memkit[{extra}]'" not in text and f" memkit[{extra}]" not in text, (path, extra)


def _third_party_imports(paths: list[Path]) -> set[str]:
    local = {"memkit", "benchmarks", "tests", "conftest"} | {p.stem for p in (ROOT / "tests").glob("*.py")}
    found: set[str] = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif (
                isinstance(node, ast.Call)
                and getattr(node.func, "attr", None) == "importorskip"
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                names = [str(node.args[0].value)]
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in local:
                    found.add(top)
    return found


def test_the_dev_extra_holds_what_the_tests_import() -> None:
    extras = PROJECT["optional-dependencies"]
    dev = {_requirement_name(r) for r in extras["dev"]}
    assert {"imageio", "diffusers"} <= dev
    allowed = dev | {_requirement_name(r) for r in PROJECT["dependencies"]}
    for requirement in extras["dev"]:  # an extra of memkit-video itself, e.g. "memkit-video[video]"
        if _requirement_name(requirement) == DIST and "[" in requirement:
            for extra in requirement.split("[")[1].split("]")[0].split(","):
                allowed |= {_requirement_name(r) for r in extras[extra.strip()]}
    modules = _third_party_imports([*(ROOT / "tests").glob("*.py"), ROOT / "conftest.py"])
    by_module = importlib.metadata.packages_distributions()
    optional_for_tests = {"accelerate", "xformers"}  # tests that use them skip with a reason when absent
    missing = {}
    for module in sorted(modules - optional_for_tests):
        dists = {_normalise(d) for d in by_module.get(module, [module])}
        if not dists & allowed:
            missing[module] = sorted(dists)
    assert not missing, f"tests import modules no dev/core requirement provides: {missing}"


def _snapshot(dest: Path) -> Path:
    """The source tree as a release would see it (no venv, caches or build output)."""
    ignore = shutil.ignore_patterns(
        ".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", ".hypothesis", ".mypy_cache",
        ".ruff_cache", ".pytest_cache", "site", "out", "memkit-demo", "*.pyc",
    )  # fmt: skip
    return Path(shutil.copytree(ROOT, dest, ignore=ignore))


def _run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, **env, "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run(args, cwd=cwd, env=environ, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


INSTALLED_CHECK = """
import importlib.metadata, pathlib, sys, torch, memkit
from memkit.models.malt import EulerSampler, MALTNetwork, generate
site = pathlib.Path(sys.argv[1])
assert pathlib.Path(memkit.__file__).is_relative_to(site), memkit.__file__
assert importlib.metadata.version("memkit-video") == memkit.__version__
info = next(site.glob("memkit_video-*.dist-info"))
assert "Apache License" in (info / "licenses" / "LICENSE").read_text()
assets = sorted(p for p in (site / "memkit" / "assets").iterdir() if (p / "model.safetensors").is_file())
assert assets, "the wheel has no bundled checkpoints"
for folder in assets:
    net = MALTNetwork.from_pretrained(folder).eval()
    c, extra = net.config, {}
    if c.action_dim:
        extra["actions"] = torch.zeros(1, c.frames_per_segment, c.action_dim)
    if c.prompt_dim:
        extra["prompt"] = torch.zeros(1, 1, c.prompt_dim)
    out = generate(net, 1, sampler=EulerSampler(steps=1), seed=0, **extra)
    assert torch.isfinite(out.video).all(), folder.name
print("loaded", len(assets), "bundled checkpoints:", ", ".join(p.name for p in assets))
"""


def test_wheel_and_sdist_build_install_load_their_checkpoints_and_run_their_tests(tmp_path: Path) -> None:
    pytest.importorskip("build", reason="the packaging test needs `build` (in the dev extra)")
    setuptools_major = int(importlib.metadata.version("setuptools").split(".")[0])
    assert setuptools_major >= 77, "this test builds without isolation: pip install 'setuptools>=77' (dev extra)"
    src = _snapshot(tmp_path / "src")
    dist = tmp_path / "dist"
    # the wheel is built from the sdist: what the sdist lacks, the wheel lacks too
    _run([sys.executable, "-m", "build", "--no-isolation", "--sdist", "--wheel", "--outdir", str(dist), str(src)], src)
    (sdist,) = dist.glob("memkit_video-*.tar.gz")
    (wheel,) = dist.glob("memkit_video-*-py3-none-any.whl")

    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert {f"memkit/assets/demo-{m}/model.safetensors" for m in ("sparse_kv", "recurrent")} <= names
    assert not any(n.startswith(("tests/", "docs/", "benchmarks/")) for n in names)

    with tarfile.open(sdist) as tf:
        members = {m.name.split("/", 1)[1] for m in tf.getmembers() if "/" in m.name}
        tf.extractall(tmp_path / "sdist", filter="data")
    for needed in ("LICENSE", "README.md", "Makefile", "mkdocs.yml", "conftest.py", "constraints.txt",
                   "tests/conftest.py", "tests/test_docs.py", "docs/index.md", "benchmarks/__init__.py",
                   "memkit/assets/demo-sparse_kv/model.safetensors"):  # fmt: skip
        assert needed in members, f"the sdist lacks {needed}"

    # the installed wheel, alone on the path (not this checkout), loads every bundled checkpoint
    site = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site), str(wheel)],
         tmp_path)  # fmt: skip
    done = _run([sys.executable, "-c", INSTALLED_CHECK, str(site)], tmp_path, PYTHONPATH=str(site))
    assert "loaded" in done.stdout

    # the unpacked sdist runs its own tests (a sample: security, extras, the docs site's pages and nav)
    (unpacked,) = (tmp_path / "sdist").iterdir()
    _run([sys.executable, "-c", "import memkit, pathlib, sys; assert pathlib.Path(memkit.__file__).is_relative_to("
          "pathlib.Path.cwd()), memkit.__file__"], unpacked, PYTHONPATH=str(unpacked))  # fmt: skip
    sample = [
        "tests/test_trust.py",
        "tests/test_packaging.py::test_the_dev_extra_holds_what_the_tests_import",
        "tests/test_docs.py::test_nav_lists_every_page",
        "tests/test_docs.py::test_api_reference_lists_every_public_name",
        "tests/test_docs.py::test_page_code_runs[docs/guides/saving.md]",
    ]
    _run([sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider", *sample], unpacked,
         PYTHONPATH=str(unpacked))  # fmt: skip


@pytest.mark.parametrize("command", ["demo", "generate"])
def test_commands_that_write_gifs_refuse_up_front_without_the_video_extra(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import time

    from memkit.cli import main
    from memkit.models.malt import MALTConfig, MALTNetwork

    monkeypatch.setitem(sys.modules, "imageio", None)  # `import imageio` now fails as if not installed
    ckpt = tmp_path / "ckpt"
    MALTNetwork(MALTConfig.preset("tiny")).save_pretrained(ckpt)
    args = {
        "demo": ["demo", "--out", str(tmp_path / "demo")],
        "generate": ["generate", "--checkpoint", str(ckpt), "--segments", "50", "--out", str(tmp_path / "gen")],
    }[command]
    started = time.perf_counter()
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "imageio" in err and "pip install 'memkit-video[video]'" in err and len(err.strip().splitlines()) == 1
    assert time.perf_counter() - started < 10  # refused before any generating
    assert not (tmp_path / "gen" / "metrics.json").exists()
