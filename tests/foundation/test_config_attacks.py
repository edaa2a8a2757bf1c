"""Hostile or mistaken config files: alias bombs, duplicate keys, huge values, huge seeds."""

from __future__ import annotations

import time

import pytest

from scaletrain.config import load_config
from scaletrain.core.config_base import MAX_YAML_VALUES, ConfigError

LAUGHS = """\
a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
train: {max_steps: *i}
"""


def test_an_alias_bomb_is_refused_at_once_naming_the_file(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(LAUGHS)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"bomb\.yaml: expands to .* values through YAML "
                                          r"aliases .*refused") as exc:
        load_config(path)
    assert time.perf_counter() - start < 5  # refused before anything is expanded
    assert len(str(exc.value)) < 300


def test_ordinary_anchors_still_work(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("logging: {wandb_tags: [&t exp, *t, *t]}\ntrain: {betas: [0.9, 0.95]}\n")
    cfg = load_config(path)
    assert cfg.logging.wandb_tags == ["exp"] * 3 and cfg.train.betas == [0.9, 0.95]
    # The bound is on the values aliases expand to, far above any real config.
    assert MAX_YAML_VALUES >= 10_000


def test_a_duplicate_section_is_refused_naming_both_lines(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("train:\n  lr: 0.1\nema:\n  decay: 0.5\ntrain:\n  max_steps: 3\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml:5: duplicate key 'train' "
                                          r"\(first at line 1\)$"):
        load_config(path)
    with pytest.raises(ConfigError, match="duplicate key 'a'"):
        load_config(None, ["train.betas={a: 1, a: 2}"])


def test_a_huge_value_is_cut_in_the_error(tmp_path):
    path = tmp_path / "huge.yaml"
    path.write_text("train:\n  lr: '" + "x" * 100_000 + "'\n")
    with pytest.raises(ConfigError, match=r"train.lr: got 'xxx.*\.\.\. \(100002 characters\)") \
            as exc:
        load_config(path)
    assert len(str(exc.value)) < 300


@pytest.mark.parametrize("seed", [2**63, 2**64, -1])
def test_seed_is_bounded(seed):
    with pytest.raises(ConfigError, match=r"seed: must be in \[0, 2\*\*63\)"):
        load_config(None, [f"seed={seed}"])
    with pytest.raises(ConfigError, match="data.seed_offset"):
        load_config(None, [f"seed={2**63 - 1}", "data.seed_offset=1"])
