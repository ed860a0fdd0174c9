"""What a newcomer meets first: ``--help`` lists the command's own config groups (each option that exists, the
default starred), and a mistyped key or option is answered ``did you mean ...?`` in one line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import oxford_ir.cli.evaluate
import oxford_ir.cli.export
import oxford_ir.cli.index
import oxford_ir.cli.search
import oxford_ir.cli.serve
import oxford_ir.cli.train
from oxford_ir.cli.hydra_typos import typo_message
from tests.test_train import REPO, run_main

CONF = REPO / "conf"
ENTRIES = {
    "train": oxford_ir.cli.train.main,
    "eval": oxford_ir.cli.evaluate.main,
    "index": oxford_ir.cli.index.main,
    "search": oxford_ir.cli.search.main,
    "serve": oxford_ir.cli.serve.main,
    "export": oxford_ir.cli.export.main,
}
#: every config group of conf/ (download/ holds oxford-ir-data's file lists, not a Hydra group)
ALL_GROUPS = {p.name for p in CONF.iterdir() if p.is_dir() and p.name not in ("hydra", "download")}
#: a group line of a help text: two spaces, the group, then its description and optionally [a|b*|c]
GROUP_LINE = re.compile(r"^  (?P<group>[a-z_/]+)\s{2,}(?P<text>.*?)(?:\s+\[(?P<options>[^\]]+)\])?$")


def composed_groups(name: str) -> dict[str, str | None]:
    """The groups the entry config ``name`` composes, with the option chosen by default."""
    with initialize_config_dir(str(CONF), version_base="1.3"):
        choices = compose(name, return_hydra_config=True).hydra.runtime.choices
    return {group: choice for group, choice in choices.items() if not group.startswith("hydra")}


def help_groups(text: str) -> dict[str, str | None]:
    """``{group: the [options] text or None}`` of the help's config-group section."""
    section = text.split("== Config groups", 1)[1].split("\n== ", 1)[0]
    found = {}
    for line in section.splitlines()[1:]:
        match = GROUP_LINE.match(line)
        if match:
            found[match["group"]] = match["options"]
    return found


@pytest.mark.parametrize("entry", list(ENTRIES))
def test_help_lists_the_commands_own_groups_with_their_options(entry: str, tmp_path: Path) -> None:
    result = run_main("--help", cwd=tmp_path, entry=ENTRIES[entry], prog=f"oxford-ir-{entry}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith(f"oxford-ir-{entry}: ")
    assert f"oxford-ir-{entry} " in result.stdout.split("== Examples ==", 1)[1]
    listed = help_groups(result.stdout)
    own = composed_groups(entry)
    assert set(own) <= set(listed), f"groups missing from the help: {set(own) - set(listed)}"
    assert not (set(listed) & (ALL_GROUPS - set(own))), "groups of other commands listed"
    for group, options in listed.items():
        if options is None:
            continue
        folder = CONF / (group if "/" not in group else f"hydra/{group.split('/', 1)[1]}")
        # a group's base.yaml is what its options start from (defaults: [base, _self_]), not an option
        options_here = sorted(p.stem for p in folder.glob("*.yaml") if p.stem != "base")
        assert sorted(o.rstrip("*") for o in options.split("|")) == options_here
        starred = [o.rstrip("*") for o in options.split("|") if o.endswith("*")]
        assert starred == ([own[group]] if own.get(group) else []), group


@pytest.mark.parametrize(
    ("entry", "args", "line"),
    [
        ("train", ["trainer.max_epoch=3"], "error: trainer.max_epoch: no such key; did you mean trainer.max_epochs?"),
        ("train", ["trainr.max_epochs=3"], "error: trainr.max_epochs: no such key; did you mean trainer.max_epochs?"),
        ("train", ["-m", "loss.margn=0.1,0.2"], "error: loss.margn: no such key; did you mean loss.margin?"),
        ("train", ["experimnt=quickstart"], "error: experimnt: no such key; did you mean experiment?"),
        ("train", ["backbone=resnet5"], "error: backbone=resnet5: no such backbone config; did you mean "
                                         "backbone=resnet50? (options: mobilenetv2, raw_pixels, resnet50, scratch, "
                                         "timm)"),
        ("train", ["data.synthetic.n_landmark=3"], "did you mean data.synthetic.n_landmarks?"),
        ("eval", ["extraction.imagesize=64"], "error: extraction.imagesize: no such key; did you mean "
                                              "extraction.image_size?"),
        ("index", ["pooling=ge"], "did you mean pooling=gem?"),
        ("search", ["whitening=learnd"], "did you mean whitening=learned?"),
        ("serve", ["prot=0"], "error: prot: no such key; did you mean port?"),
    ],
)  # fmt: skip
def test_a_typo_is_answered_with_its_close_match(entry: str, args: list[str], line: str) -> None:
    message = typo_message(entry, args)
    assert message is not None and line in message and "\n" not in message


@pytest.mark.parametrize(
    "args",
    [["foo=1"], ["backbone=nope"], ["trainer.max_epochs=3", "experiment=quickstart"], ["--help"],
     ["+trainer.max_epoch=3"], ["hydra.run.dir=x"], ["-m", "miner=batch_hard,triplet_all"]],
)  # fmt: skip
def test_no_close_match_or_a_valid_line_is_left_to_hydra(args: list[str]) -> None:
    assert typo_message("train", args) is None


@pytest.mark.parametrize(
    ("entry", "argument", "line"),
    [
        ("eval", "extraction.imagesize=64", "error: extraction.imagesize: no such key; did you mean "
                                            "extraction.image_size?"),
        ("index", "pooling=ge", "error: pooling=ge: no such pooling config; did you mean pooling=gem?"),
        ("search", "kk=3", "error: kk: no such key; did you mean k?"),
        ("train", "-m loss.margn=0.1,0.2", "error: loss.margn: no such key; did you mean loss.margin?"),
    ],
)  # fmt: skip
def test_console_scripts_print_one_line_and_exit_1(entry: str, argument: str, line: str, tmp_path: Path) -> None:
    result = run_main(*argument.split(), cwd=tmp_path, entry=ENTRIES[entry], prog=f"oxford-ir-{entry}")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(line), result.stderr[-2000:]


def test_a_valid_command_line_is_composed_by_hydra_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The typo check costs nothing until Hydra refuses a line: a command that runs composes its config only in
    Hydra's own two passes (its run mode, then the job), never in a check of its own beforehand."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    calls: list[list[str]] = []
    original = ConfigLoaderImpl.load_configuration

    def counted(self, config_name, overrides, *args, **kwargs):
        calls.append(list(overrides))
        return original(self, config_name, overrides, *args, **kwargs)

    monkeypatch.setattr(ConfigLoaderImpl, "load_configuration", counted)
    monkeypatch.setattr(oxford_ir.cli.search, "search", lambda cfg: None)  # the composition is what is counted
    result = run_main("index=nowhere", "k=3", cwd=tmp_path, entry=ENTRIES["search"], prog="oxford-ir-search")
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(calls) == 2 and all("k=3" in c for c in calls), calls
