"""docs/configuration.md is generated from the dataclasses and must match them."""

from dataclasses import dataclass
from pathlib import Path

from scaletrain.config_docs import field_comments, generate

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_reference_is_in_sync_with_the_dataclasses():
    assert DOC.read_text(encoding="utf-8") == generate(), (
        "docs/configuration.md is stale: run `python -m scaletrain.config_docs > "
        "docs/configuration.md`"
    )


@dataclass
class _Documented:
    # ---- optimiser ----------------------------------------------------------
    # Learning rate of AdamW,
    # after warm-up.
    lr: float = 1.0
    steps: int = 3  # optimizer steps
    bare: int = 0


def test_field_comments_reads_comments_above_and_beside_fields():
    assert field_comments(_Documented) == {
        "lr": "Learning rate of AdamW, after warm-up.",
        "steps": "optimizer steps",
        "bare": "",
    }


def test_every_root_key_appears_in_the_reference():
    text = generate()
    for key in ("`seed`", "`model.arch`", "`train.max_steps`", "`checkpoint.every`", "`data.path`"):
        assert key in text


@dataclass
class _Child(_Documented):
    steps: int = 5  # a new default keeps the parent's comment unless it has its own


def test_inherited_fields_keep_their_base_class_comments():
    comments = field_comments(_Child)
    assert comments["lr"] == "Learning rate of AdamW, after warm-up."
    assert comments["steps"] == "a new default keeps the parent's comment unless it has its own"
