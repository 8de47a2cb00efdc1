"""The installed package ships recipes and kernels, and registers its Modifiers on import."""

import tomllib
from pathlib import Path

import pytest

import qvlm_modifiers
from qvlm_modifiers.errors import RecipeError

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed_in_pyproject():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    on_disk = {
        "qvlm_modifiers" + "".join("." + p for p in d.relative_to(ROOT / "src" / "qvlm_modifiers").parts)
        for d in (ROOT / "src" / "qvlm_modifiers").rglob("*")
        if d.is_dir() and (d / "__init__.py").exists()
    } | {"qvlm_modifiers"}
    missing = on_disk - listed
    assert not missing, f"add {sorted(missing)} to [tool.setuptools] packages in pyproject.toml"


def test_recipes_ship_with_the_package_and_resolve_by_name():
    recipes = qvlm_modifiers.list_recipes()
    repo_recipes = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))
    assert sorted(recipes) == repo_recipes and repo_recipes, "recipes/ must ship as package data"
    for name, path in recipes.items():
        assert qvlm_modifiers.recipe_path(name) == path
        assert qvlm_modifiers.recipe_path(str(ROOT / "recipes" / f"{name}.yaml")).is_file()


def test_unknown_recipe_name_lists_the_shipped_ones():
    with pytest.raises(RecipeError) as err:
        qvlm_modifiers.recipe_path("no_such_recipe")
    msg = str(err.value)
    assert "no_such_recipe" in msg and next(iter(qvlm_modifiers.list_recipes())) in msg


def test_kernels_ship_as_subpackage():
    import qvlm_modifiers.kernels as kernels

    assert Path(kernels.__file__).resolve().parent == (ROOT / "kernels").resolve()


def test_import_registers_every_modifier_with_llmcompressor():
    from llmcompressor.modifiers.factory import ModifierFactory

    from qvlm_modifiers._registry import all_modifiers

    classes = all_modifiers()
    assert {c.__name__ for c in classes} >= {"MBQModifier", "QVLMModifier"}
    for cls in classes:
        assert ModifierFactory._registered_registry[cls.__name__] is cls
        # created by name exactly as a YAML recipe would be
        assert isinstance(ModifierFactory.create(cls.__name__, allow_registered=True, allow_experimental=False), cls)
