"""conf/data: one base holding every key, each variant ``defaults: [base, _self_]`` plus what differs.

The variants were 70-line copies of each other until ``base.yaml`` (issue 17 item 6). The files of that time are
kept verbatim in ``tests/fixtures/conf_data_before_base``; ``oxford-ir-train`` composes every one of them and every
experiment (each with its own data variant) from a copy of ``conf/`` holding those files, and from ``conf/``
itself: the ``data`` nodes must be equal. A key added to the base since (a new argument of the DataModule) is
allowed when every old variant takes the base's value: an old recipe trains as before. The experiments are
composed with their own data variant only: they are merged on top of the variant's node, which is equal.

A value that changes on purpose in an old variant also changes in the fixture file, with the reason in the commit.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
BEFORE = REPO / "tests" / "fixtures" / "conf_data_before_base"
OLD_VARIANTS = sorted(p.stem for p in BEFORE.glob("*.yaml"))
VARIANTS = sorted(p.stem for p in (CONF / "data").glob("*.yaml") if p.stem != "base")
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def _data_nodes(conf: Path, experiments: list[str], variants: list[str]) -> dict[str, dict[str, Any]]:
    """``{"data=<v>" | "experiment=<e>": the composed data node, interpolations kept}`` of ``oxford-ir-train``.

    The variants are composed side by side in one config (``data@<v>: <v>``: the node that ``data=<v>`` gives
    train), the experiments one ``oxford-ir-train`` composition each."""
    (conf / "probe.yaml").write_text("defaults:\n" + "".join(f"  - data@{v}: {v}\n" for v in variants))
    with initialize_config_dir(str(conf), version_base="1.3"):
        probe = OmegaConf.to_container(compose("probe"))
        nodes = {f"data={v}": probe[v] for v in variants}
        for experiment in experiments:
            cfg = compose("train", overrides=[f"experiment={experiment}"])
            nodes[f"experiment={experiment}"] = OmegaConf.to_container(cfg.data)
    return nodes


@pytest.fixture(scope="module")
def composed(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    """The data nodes composed from today's conf/ and from conf/ with the data files before the base."""
    new_conf, old_conf = (tmp_path_factory.mktemp(name) / "conf" for name in ("after", "before"))
    shutil.copytree(CONF, new_conf, ignore=shutil.ignore_patterns("download"))
    shutil.copytree(CONF, old_conf, ignore=shutil.ignore_patterns("data", "download"))
    shutil.copytree(BEFORE, old_conf / "data")
    # experiments on a data variant the old files lack are new: not compared; two with the same data are one
    by_data = {}
    for experiment in EXPERIMENTS:
        recipe = OmegaConf.load(CONF / "experiment" / f"{experiment}.yaml")
        choice = _data_choice(recipe)
        if choice in (*OLD_VARIANTS, None):
            by_data.setdefault(
                repr((choice, OmegaConf.to_container(recipe.get("data") or OmegaConf.create({})))), experiment
            )
    experiments = sorted(by_data.values())
    return _data_nodes(new_conf, experiments, OLD_VARIANTS), _data_nodes(old_conf, experiments, OLD_VARIANTS)


def _data_choice(recipe: Any) -> str | None:
    """The data variant an experiment chooses (``override /data: <v>``), or None."""
    entries = OmegaConf.to_container(recipe).get("defaults", [])
    found = next((e["override /data"] for e in entries if isinstance(e, dict) and "override /data" in e), None)
    for entry in entries:  # an experiment built on another (cirtorch_sfm120k_r50 on _r101) takes its data
        if found is None and isinstance(entry, str) and entry != "_self_":
            found = _data_choice(OmegaConf.load(CONF / "experiment" / f"{entry}.yaml"))
    return found


def test_every_variant_and_experiment_composes_the_data_node_of_before_the_base(composed) -> None:
    new, old = composed
    assert set(new) == set(old) and {f"data={v}" for v in OLD_VARIANTS} <= set(new)
    assert len(OLD_VARIANTS) == 6 and set(OLD_VARIANTS) <= set(VARIANTS)
    base = OmegaConf.to_container(OmegaConf.load(CONF / "data" / "base.yaml"))
    for name, node in new.items():
        before = old[name]
        assert {k: node[k] for k in before if k in node} == before, name
        assert set(before) <= set(node), f"{name}: keys lost {set(before) - set(node)}"
        added = {k: node[k] for k in set(node) - set(before)}
        assert added == {k: base[k] for k in added}, f"{name}: a key added since takes another value than the base's"


def test_a_variant_sets_only_what_differs_from_the_base() -> None:
    """Each variant file is its defaults and the keys whose value is not the base's (nested keys too); a mandatory
    ``???`` may be restated, with the comment saying what this variant takes."""
    base = OmegaConf.to_container(OmegaConf.load(CONF / "data" / "base.yaml"))
    for variant in VARIANTS:
        own = OmegaConf.to_container(OmegaConf.load(CONF / "data" / f"{variant}.yaml"))
        assert own.pop("defaults") == ["base", "_self_"], variant
        assert "benchmark" in own, f"{variant}: names no benchmark (the base's is mandatory)"
        for key, value in own.items():
            assert key in base, f"data={variant}: {key} is not a key of conf/data/base.yaml"
            if value != "???":
                assert _differs(value, base[key]), f"data={variant}: {key}={value!r} repeats the base's value"


def _differs(value: Any, base: Any) -> bool:
    """Whether merging ``value`` onto ``base`` changes it, and every nested key of ``value`` does."""
    if isinstance(value, dict) and isinstance(base, dict) and base:
        return all(k not in base or _differs(v, base[k]) for k, v in value.items())
    return value != base


def test_the_base_is_not_an_option_it_names_no_benchmark() -> None:
    base = OmegaConf.load(CONF / "data" / "base.yaml")
    assert OmegaConf.is_missing(base, "benchmark")
    assert base._target_ == "oxford_ir.data.datamodule.RetrievalDataModule" and base._convert_ == "all"
