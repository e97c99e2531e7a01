"""The traps a new user falls into (issue 8): config keys, --help, parse errors, guidance, short runs,
eval files per bucketing, the progress bar. Each test states the behaviour a user should see."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import typer.main
from tide.cli import app
from tide.cliconfig import REFERENCE_MARKERS, REPO, default_text
from tide.cliconfig import config_reference as reference_text
from tide.harvest.config import HarvestConfig
from tide.train.fit.checkpoint import load_sae
from tide.train.fit.config import TrainConfig
from typer.testing import CliRunner

from tests.factories import random_store

runner = CliRunner()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """8 samples x 4 steps x 8 tokens x D 8, one layer: a run of a few steps takes a second."""
    return random_store(tmp_path_factory.mktemp("traps") / "s.zarr", num_samples=8, d_model=8, batch_size=2)


def _train(store, out, *args: str):
    base = ["train", "--store", str(store.path), "--out", str(out), "--k", "2", "--expansion", "2"]
    return runner.invoke(app, [*base, "--batch-size", "16", "--val-fraction", "0.25", *args])


def _fails(args: list[str], *needles: str) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "error: " in result.output, result.output
    for n in needles:
        assert n in result.output, result.output
    return result.output


# ---- 2. config keys are the option names; every setting is documented -------------------------------
def test_config_file_keys_are_the_option_names(store, tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('arch = "topk"\nmax_steps = 2\nwarmup_steps = 0\n')
    result = _train(store, tmp_path / "a", "--config", str(toml), "--no-progress", "--no-eval")
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "a" / "train_config.json").read_text())
    assert saved["archs"] == ["topk"]  # saved under the field's name: old runs' identity is unchanged
    renamed = {("arch" if k == "archs" else k): v for k, v in saved.items()}
    assert TrainConfig(**saved) == TrainConfig(**renamed)  # either name reads back the same config
    # An old file's `archs` is still read, and the --arch flag replaces it rather than clashing with it.
    yaml_file = tmp_path / "old.yaml"
    yaml_file.write_text("archs: topk\nmax_steps: 2\nwarmup_steps: 0\n")
    result = _train(store, tmp_path / "b", "--config", str(yaml_file), "--arch", "relu", "--no-progress")
    assert result.exit_code == 0, result.output
    assert [p.name for p in (tmp_path / "b").iterdir() if p.is_dir()] == ["resid_l00-relu"]
    # A misspelt key says which file, and suggests the setting.
    yaml_file.write_text("arcs: topk\n")
    _fails(["train", "--config", str(yaml_file)], f"arcs in {yaml_file} is not a setting", "did you mean")


def test_docs_document_every_setting():
    """docs/settings.md holds `tide config-reference` as it is now: one row per field of both configs."""
    readme = (REPO / "docs" / "settings.md").read_text()
    start, end = REFERENCE_MARKERS
    assert start in readme and end in readme
    section = readme.split(start, 1)[1].split(end, 1)[0]
    keys = re.findall(r"^\| `(\w+)` \|", section, flags=re.M)
    for model_cls, option_names in ((HarvestConfig, {}), (TrainConfig, {"archs": "arch"})):
        fields = [option_names.get(f, f) for f in model_cls.model_fields]
        missing = set(fields) - set(keys)
        assert not missing, (
            f"{missing} missing from docs/settings.md: run `tide config-reference --readme docs/settings.md`"
        )
        for name, field in model_cls.model_fields.items():
            assert field.description, f"{model_cls.__name__}.{name} has no docstring"
    assert len(keys) == len(HarvestConfig.model_fields) + len(TrainConfig.model_fields)
    assert section.strip() == reference_text(app).strip(), (
        "docs/settings.md's config reference is stale: run `tide config-reference --readme docs/settings.md`"
    )


# ---- 3. --help: flags read as flags, every option states its default ----------------------------------
@pytest.mark.parametrize(
    "command, model_cls, field_of",
    [("harvest", HarvestConfig, {}), ("train", TrainConfig, {"arch": "archs"})],
)
def test_help_shows_flags_as_flags_and_every_default(command, model_cls, field_of):
    text = runner.invoke(app, [command, "--help"]).output
    assert "<bool>" not in text and "--overwrite " in text, text
    checked = set()
    for param in typer.main.get_command(app).commands[command].params:
        field = field_of.get(param.name, param.name)
        if param.is_flag or field not in model_cls.model_fields:
            continue  # an on/off flag's default is off; --config is no setting
        default = model_cls.model_fields[field].default
        assert "[default: " in param.help, f"--{param.name}'s help states no default: {param.help!r}"
        if default is not None:
            after = param.help.split("[default: ", 1)[1]
            want = default_text(default)
            assert re.match(re.escape(want) + r"[\],; ]", after), (param.name, want, param.help)
        checked.add(field)
    assert len(checked) > 15


# ---- 4. parse errors are one paragraph naming the option or file ------------------------------------
def test_step_selection_errors_name_the_option(tiny_dit, tmp_path):
    base = ["harvest", "--model", str(tiny_dit), "--out", str(tmp_path / "s.zarr"), "--no-progress"]
    _fails([*base, "--num-steps", "8", "--steps", "10:20:1"], "--steps", "selects no step of num_steps=8")
    _fails([*base, "--steps", "::0"], "--steps", "'::0' has stride 0")
    _fails([*base, "--steps", "20:10"], "--steps", "selects no step")
    assert HarvestConfig(steps="10:20", num_steps=50).step_indices(50) == list(range(10, 20))


def test_malformed_config_files_name_the_file_and_line(tmp_path):
    bad_yaml = tmp_path / "run.yaml"
    bad_yaml.write_text("num_samples: 4\nsteps: [1,\n")
    _fails(["harvest", "--config", str(bad_yaml)], f"config file {bad_yaml} is not valid YAML", "line 3")
    bad_toml = tmp_path / "run.toml"
    bad_toml.write_text("num_samples = \n")
    _fails(["train", "--config", str(bad_toml)], f"config file {bad_toml} is not valid TOML", "line 1")


# ---- 5. guidance below 1 ----------------------------------------------------------------------------
def test_guidance_below_one_is_refused(tiny_dit, tmp_path):
    args = ["harvest", "--model", str(tiny_dit), "--out", str(tmp_path / "s.zarr"), "--num-samples", "2"]
    _fails([*args, "--batch-size", "2", "--num-steps", "2", "--guidance-scale", "-3"], "guidance_scale=-3.0")
    for bad in (0.5, float("nan")):
        with pytest.raises(ValueError, match="1 means no classifier-free guidance"):
            HarvestConfig(guidance_scale=bad)
    assert HarvestConfig(guidance_scale=1).guidance_scale == 1


# ---- 6. a short run gets the steps it asked for -----------------------------------------------------
def test_max_steps_below_the_default_warmup(store, tmp_path):
    out = tmp_path / "o"
    result = _train(store, out, "--max-steps", "5", "--no-progress", "--no-eval")
    assert result.exit_code == 0, result.output
    assert "warm-up of 0 steps" in result.output
    meta = load_sae(out / "resid_l00-tide-k2").meta
    assert meta.trained_steps == 5 and meta.train_config["warmup_steps"] == 0
    again = _train(store, out, "--max-steps", "5", "--no-progress", "--no-eval")
    assert again.exit_code == 0 and "resuming at step 5" in again.output  # same config, same identity
    _fails(
        ["train", "--store", str(store.path), "--max-steps", "5", "--warmup-steps", "10"],
        "warmup_steps=10 must be below max_steps=5",
    )
    # Configurations that were valid before keep their warm-up (and so their resume identity).
    assert [TrainConfig(max_steps=m).warmup_steps for m in (None, 51, 1000)] == [50, 50, 50]
    assert [TrainConfig(max_steps=m).warmup_steps for m in (1, 5, 50)] == [0, 0, 5]


# ---- 7. tide eval --buckets N keeps the default results (the table: tests/test_eval.py) ------------
def test_eval_with_other_buckets_keeps_the_default_results(store, tmp_path):
    out = tmp_path / "o"
    trained = _train(store, out, "--max-steps", "3", "--arch", "topk", "--no-progress")
    assert trained.exit_code == 0, trained.output
    folder = out / "resid_l00-topk-k2"
    default = (folder / "eval.json").read_bytes()
    assert len(json.loads(default)["buckets"]) == 4  # every one of the 4 steps: 10 buckets at most
    result = runner.invoke(app, ["eval", str(out), "--buckets", "2"])
    assert result.exit_code == 0, result.output
    assert (folder / "eval.json").read_bytes() == default
    two = json.loads((folder / "eval_b2.json").read_text())
    assert len(two["buckets"]) == 2 and f"wrote {folder / 'eval_b2.json'}" in result.output
    step_fvus = [g["fvu"] for g in two["per_step"]]
    mean_line = next(ln for ln in result.output.splitlines() if ln.startswith("step mean"))
    assert mean_line.split()[4] == f"{np.mean(step_fvus):.4f}"


# ---- 8. the progress bar names its SAEs (progress_text: tests/test_eval.py) ---------------------------
def test_training_bar_shows_the_names(store, tmp_path):
    result = _train(store, tmp_path / "o", "--max-steps", "2", "--no-eval")  # progress bar on
    assert result.exit_code == 0, result.output
    assert re.search(
        r"tide-k2 fvu [\d.]+ L0 [\d.]+ \| topk-k2 fvu [\d.]+ L0 [\d.]+ \| [\d,]+ rows/s", result.output
    )
