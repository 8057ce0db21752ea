"""The extension's build files list exactly the files on disk; metadata files agree with each other."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "SimpleSliceNet"


def cmake_list(text: str, name: str) -> list[str]:
    """Entries of ``set(NAME ...)`` in a CMake file (comments dropped)."""
    match = re.search(rf"set\(\s*{name}\s+(.*?)\)", text, re.S)
    assert match, f"set({name} ...) not found"
    lines = (line.split("#", 1)[0] for line in match.group(1).splitlines())
    return [token for line in lines for token in line.split()]


def cmake_var(text: str, name: str) -> str:
    match = re.search(rf'set\(\s*{name}\s+"([^"]*)"\s*\)', text)
    assert match, f"set({name} ...) not found"
    return match.group(1)


def files_under(folder: Path) -> set[str]:
    """Every file below ``folder`` that would ship: no caches, no hidden files."""
    return {
        str(path.relative_to(folder).as_posix())
        for path in folder.rglob("*")
        if path.is_file()
        and "__pycache__" not in path.parts
        and path.suffix != ".pyc"
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    }


def s4ext_fields() -> dict[str, str]:
    fields = {}
    for line in (ROOT / "SimpleSliceNet.s4ext").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition(" ")
            fields[key] = value.strip()
    return fields


@pytest.fixture(scope="module")
def module_cmake() -> str:
    return (MODULE_DIR / "CMakeLists.txt").read_text()


@pytest.fixture(scope="module")
def top_cmake() -> str:
    return (ROOT / "CMakeLists.txt").read_text()


def _report(missing: set[str], extra: set[str], what: str) -> str:
    return f"{what}: add to CMakeLists.txt {sorted(missing)}; listed but not on disk {sorted(extra)}"


def test_every_module_script_is_listed(module_cmake):
    listed = {
        entry.replace("${MODULE_NAME}", "SimpleSliceNet") for entry in cmake_list(module_cmake, "MODULE_PYTHON_SCRIPTS")
    }
    on_disk = {name for name in files_under(MODULE_DIR) if name.endswith(".py")}
    assert listed == on_disk, _report(on_disk - listed, listed - on_disk, "SimpleSliceNet/")


def test_the_module_folder_holds_only_the_module_script_and_its_library():
    # Slicer loads every .py at the top of a module folder as a module of its own.
    top_level_scripts = {path.name for path in MODULE_DIR.glob("*.py")}
    assert top_level_scripts == {"SimpleSliceNet.py"}
    others = {name for name in files_under(MODULE_DIR) if not name.endswith(".py")} - {"CMakeLists.txt"}
    assert others == set(), f"files the build does not install: {sorted(others)}"


def test_every_training_file_is_listed(module_cmake):
    listed = set(cmake_list(module_cmake, "MODULE_TRAINING_FILES"))
    on_disk = files_under(ROOT / "training")
    assert listed == on_disk, _report(on_disk - listed, listed - on_disk, "training/")


def test_every_resource_is_listed(module_cmake):
    listed = set(cmake_list(module_cmake, "MODULE_RESOURCE_FILES"))
    on_disk = files_under(ROOT / "Resources")
    assert listed == on_disk, _report(on_disk - listed, listed - on_disk, "Resources/")
    assert {"UI/SimpleSliceNet.ui", "Icons/SimpleSliceNet.png"} <= listed


def test_module_build_macro_and_tests(module_cmake):
    assert "slicerMacroBuildScriptedModule(" in module_cmake
    assert "SCRIPTS ${MODULE_PYTHON_SCRIPTS}" in module_cmake
    assert "RESOURCES ${MODULE_PYTHON_RESOURCES}" in module_cmake
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in module_cmake


def test_top_level_cmake_declares_the_extension(top_cmake):
    assert re.search(r"project\(\s*SimpleSliceNet\s*\)", top_cmake)
    assert "add_subdirectory(SimpleSliceNet)" in top_cmake
    assert cmake_var(top_cmake, "EXTENSION_CATEGORY") == "Neuroimaging"
    for include in ("Slicer_USE_FILE", "Slicer_EXTENSION_GENERATE_CONFIG", "Slicer_EXTENSION_CPACK"):
        assert f"${{{include}}}" in top_cmake


def test_s4ext_matches_the_cmake_metadata(top_cmake):
    fields = s4ext_fields()
    assert fields["scm"] == "git"
    assert fields["homepage"] == cmake_var(top_cmake, "EXTENSION_HOMEPAGE")
    assert fields["category"] == cmake_var(top_cmake, "EXTENSION_CATEGORY")
    assert fields["contributors"] == cmake_var(top_cmake, "EXTENSION_CONTRIBUTORS")
    assert fields["description"] == cmake_var(top_cmake, "EXTENSION_DESCRIPTION")
    assert fields["iconurl"] == cmake_var(top_cmake, "EXTENSION_ICONURL")
    assert fields["screenshoturls"] == cmake_var(top_cmake, "EXTENSION_SCREENSHOTURLS")
    assert fields["depends"] == cmake_var(top_cmake, "EXTENSION_DEPENDS")
    assert fields["build_subdirectory"] == "."
    assert fields["scmurl"].startswith(fields["homepage"])


def test_extensions_index_entry_matches_the_s4ext():
    entry = json.loads((ROOT / "SimpleSliceNet.json").read_text())
    fields = s4ext_fields()
    assert entry["category"] == fields["category"]
    assert entry["scm_url"] == fields["scmurl"]
    assert entry["scm_revision"] == fields["scmrevision"]
    assert entry["build_subdirectory"] == fields["build_subdirectory"]
    assert entry["build_dependencies"] == ([] if fields["depends"] == "NA" else fields["depends"].split())
    assert "slicer-extension-catalog-entry-schema" in entry["$schema"]


def test_urls_point_at_files_in_this_repository(top_cmake):
    raw = "https://raw.githubusercontent.com/"
    urls = [cmake_var(top_cmake, "EXTENSION_ICONURL"), *cmake_var(top_cmake, "EXTENSION_SCREENSHOTURLS").split()]
    for url in urls:
        assert url.startswith(raw)
        relative = url.split("/", 6)[6]  # after host/owner/repo/branch
        assert (ROOT / relative).is_file(), f"{url}: {relative} is not in the repository"


def test_icon_is_a_128_pixel_png_and_licence_is_apache():
    icon = (ROOT / "Resources" / "Icons" / "SimpleSliceNet.png").read_bytes()
    assert icon[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(icon[16:20], "big"), int.from_bytes(icon[20:24], "big")
    assert (width, height) == (128, 128)
    licence = (ROOT / "LICENSE").read_text()
    assert "Apache License" in licence and "Version 2.0, January 2004" in licence
