"""Recipes: typed loading, overrides converted by field type, every problem reported with its path."""

from pathlib import Path

import pytest

from llmstages.config import build_recipe, builtin_recipes, load_recipe, recipe_diff, to_dict
from llmstages.errors import RecipeError, UserError


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_and_run_name_from_file_stem(tmp_path):
    recipe = load_recipe(write(tmp_path, "model:\n  size: tiny\n", "my-run.yaml"))
    assert recipe.run == "my-run"
    assert recipe.data.name == "my-run"
    assert recipe.model.size == "tiny"


def test_overrides_are_converted_by_declared_type():
    recipe = build_recipe({}, ["train.lr=3e-4", "train.max_steps=1e3", "train.compile=yes",
                               "data.source=a.txt,b.txt", "init_from=none", "model.n_layer=6"])
    assert recipe.train.lr == 3e-4 and isinstance(recipe.train.lr, float)
    assert recipe.train.max_steps == 1000 and isinstance(recipe.train.max_steps, int)
    assert recipe.train.compile is True
    assert recipe.data.source == ["a.txt", "b.txt"]
    assert recipe.init_from is None
    assert recipe.model.n_layer == 6


def test_yaml_string_numbers_become_floats(tmp_path):
    # YAML 1.1 reads `3e-4` as a string; the field's type decides.
    recipe = load_recipe(write(tmp_path, "train:\n  lr: 3e-4\n  min_lr: 1e-5\n"))
    assert recipe.train.lr == pytest.approx(3e-4)


def test_single_string_where_a_list_is_expected(tmp_path):
    recipe = load_recipe(write(tmp_path, "data:\n  source: books/*.txt\n"))
    assert recipe.data.source == ["books/*.txt"]


def test_unknown_key_suggests_the_right_name(tmp_path):
    with pytest.raises(RecipeError) as err:
        load_recipe(write(tmp_path, "train:\n  learing_rate: 0.001\n"))
    assert "train.learing_rate" in str(err.value)
    assert "did you mean `train.lr`" in str(err.value)


def test_key_in_the_wrong_section_points_to_its_section():
    with pytest.raises(RecipeError) as err:
        build_recipe({"model": {"max_steps": 10}})
    assert "did you mean `train.max_steps`" in str(err.value)


def test_every_problem_is_listed_with_its_path():
    with pytest.raises(RecipeError) as err:
        build_recipe({"train": {"lr": "fast", "max_steps": -1, "batchsize": 4}, "model": {"size": "huge"},
                      "finetune": {"balance": "wheighted"}})
    paths = [p for p, _ in err.value.problems]
    assert paths == ["train.lr", "train.max_steps", "train.batchsize", "model.size", "finetune.balance"]
    text = str(err.value)
    assert "expected a number, got 'fast'" in text
    assert "below the minimum 1" in text
    assert "did you mean `weighted`" in text


def test_bad_override_names_the_override():
    with pytest.raises(RecipeError) as err:
        build_recipe({}, ["train.max_steps=ten", "train.lrr=1", "nokeyvalue"])
    text = str(err.value)
    assert "train.max_steps=ten" in text
    assert "did you mean `train.lr`" in text
    assert "not KEY=VALUE" in text


def test_cross_field_checks():
    with pytest.raises(RecipeError) as err:
        build_recipe({"train": {"micro_batch_size": 3, "global_batch_size": 8},
                      "model": {"n_embd": 100, "n_head": 3}, "finetune": {"trainable": "last_blocks"}})
    paths = {p for p, _ in err.value.problems}
    assert {"train.global_batch_size", "model.n_embd", "finetune.trainable"} <= paths


def test_python_tags_are_refused(tmp_path):
    evil = write(tmp_path, "run: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(UserError) as err:
        load_recipe(evil)
    assert "r.yaml:1" in str(err.value)
    assert not (tmp_path / "pwned").exists()


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = write(tmp_path, "train:\n  lr: 1\n   bad: [\n")
    with pytest.raises(UserError) as err:
        load_recipe(path)
    assert str(err.value).startswith(f"{path}:3: invalid recipe YAML")  # line 3 holds the bad indent


def test_duplicate_keys_are_refused(tmp_path):
    with pytest.raises(UserError, match="duplicate key 'lr'"):
        load_recipe(write(tmp_path, "train:\n  lr: 1.0e-3\n  lr: 2.0e-3\n"))


def test_missing_recipe_suggests_builtin(tmp_path):
    with pytest.raises(UserError, match="no such recipe"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(UserError) as err:
        load_recipe("quickstrat")
    assert "did you mean `quickstart`" in str(err.value.hint)


def test_a_folder_is_not_a_recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "quickstart").mkdir()  # e.g. a data folder named like a built-in recipe
    assert load_recipe("quickstart").run == "quickstart"  # the built-in one, not the folder
    (tmp_path / "notes.yaml").mkdir()
    for name in ("notes.yaml", str(tmp_path / "notes.yaml")):
        with pytest.raises(UserError, match="is a folder, not a recipe file"):
            load_recipe(name)


def test_recipe_diff():
    a = to_dict(build_recipe({}))
    b = to_dict(build_recipe({}, ["train.lr=1e-3"]))
    assert recipe_diff(a, b) == [("train.lr", 6e-4, 1e-3)]


@pytest.mark.parametrize("path", builtin_recipes(), ids=lambda p: p.stem)
def test_every_builtin_recipe_parses(path):
    recipe = load_recipe(path)
    assert recipe.description, f"{path.name} needs a one-line description"
    assert recipe.data.source, f"{path.name} names no data source"


def test_list_overrides_accept_yaml_style_quotes():
    recipe = build_recipe({}, ['data.source=["a b.txt", \'c.txt\', d.txt]'])
    assert recipe.data.source == ["a b.txt", "c.txt", "d.txt"]


def test_lora_targets_must_name_linear_layers_of_the_model():
    with pytest.raises(RecipeError) as err:
        build_recipe({"finetune": {"trainable": "lora", "lora_targets": ["c_attn", "c_atn"]}})
    assert [p for p, _ in err.value.problems] == ["finetune.lora_targets"]
    assert "c_atn: not a linear layer" in str(err.value)
    with pytest.raises(RecipeError, match="LoRA needs some of"):
        build_recipe({"finetune": {"trainable": "lora", "lora_targets": []}})


def test_finetune_task_must_match_the_recipe_given_with_it(capsys):
    from llmstages.cli import main as cli_main
    spam = str(Path(__file__).resolve().parents[1] / "recipes" / "finetune-spam.yaml")
    assert cli_main(["finetune", "--task", "bogus", spam, "--dry-run"]) == 2
    assert "--task bogus: unknown task" in capsys.readouterr().err
    assert cli_main(["finetune", "--task", "instruct", spam, "--dry-run"]) == 2
    assert "wants a instruct recipe" in " ".join(capsys.readouterr().err.split())


@pytest.mark.parametrize("override,path,expected", [
    ("train.max_steps=1e3", "train.max_steps", 1000), ("train.max_steps=2_000", "train.max_steps", 2000),
    ("train.compile=yes", "train.compile", True), ("train.compile=Off", "train.compile", False),
    ("train.lr=3e-4", "train.lr", 3e-4), ("run=2024", "run", "2024")])
def test_overrides_are_converted_by_the_field_type(override, path, expected):
    section, _, key = path.rpartition(".")
    recipe = build_recipe({}, [override])
    value = getattr(getattr(recipe, section), key) if section else getattr(recipe, key)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("override,message", [
    ("train.max_steps=1.5", "train.max_steps: expected an integer, got '1.5'"),
    ("train.max_steps=true", "train.max_steps: expected an integer, got 'true'"),
    ("train.compile=maybe", "train.compile: expected true or false, got 'maybe'"),
    ("train.lr=inf", "train.lr: expected a finite number, got 'inf'"),
    ("train.lr=2", "train.lr: 2.0 is above the maximum 1.0"),
    ("train.lr=0", "train.lr: 0.0 must be greater than 0.0"),
    ("train.max_steps=-3", "train.max_steps: -3 is below the minimum"),
])
def test_bad_override_values_name_the_key_and_the_problem(override, message):
    with pytest.raises(UserError) as err:
        build_recipe({}, [override])
    assert message in str(err.value)


def test_recipe_shape_errors(tmp_path):
    with pytest.raises(UserError, match="train: expected a section \\(mapping\\), got list"):
        build_recipe({"train": [1, 2]})
    with pytest.raises(UserError, match="a recipe must be a mapping of sections, got list"):
        load_recipe(write(tmp_path, "- a\n- b\n"))
    (tmp_path / "latin.yaml").write_bytes("run: caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8 text"):
        load_recipe(tmp_path / "latin.yaml")
    with pytest.raises(UserError, match="no such recipe file"):
        load_recipe(tmp_path / "missing.yaml")
    assert load_recipe(write(tmp_path, "", name="empty.yaml")).run == "empty"  # all defaults; run = the stem
