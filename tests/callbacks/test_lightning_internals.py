"""The Lightning internals ddpm relies on (ddpm.callbacks._lightning) exist in the installed
version with the parameters we call them with; a change is reported naming each one."""

from __future__ import annotations

import pytest
from pytorch_lightning.callbacks import ModelCheckpoint

from ddpm.callbacks._lightning import check_internals, internals_problems


def test_the_installed_lightning_has_every_internal_we_use() -> None:
    assert internals_problems() == []
    check_internals()


def test_a_renamed_or_changed_internal_is_reported_by_name() -> None:
    class Upgraded(ModelCheckpoint):
        def _save_checkpoint(self, trainer, path):  # type: ignore[override]  # renamed parameter
            pass

    class Bare:
        pass

    problems = internals_problems(
        {
            (Upgraded, "_save_checkpoint"): ("self", "trainer", "filepath"),
            (Upgraded, "_save_topk_checkpoint_v2"): ("self",),
        },
        checkpoint=Bare(),
    )
    assert problems[0] == (
        "Upgraded._save_checkpoint takes ('self', 'trainer', 'path'), "
        "not ('self', 'trainer', 'filepath')"
    )
    assert problems[1] == "Upgraded._save_topk_checkpoint_v2 is gone"
    assert "Bare._defer_save_until_validation is gone" in problems


def test_check_internals_raises_naming_the_change(monkeypatch: pytest.MonkeyPatch) -> None:
    import ddpm.callbacks._lightning as internals

    extra = (*internals.MODEL_CHECKPOINT_ATTRIBUTES, "_no_such_attribute")
    monkeypatch.setattr(internals, "MODEL_CHECKPOINT_ATTRIBUTES", extra)
    with pytest.raises(ImportError, match=r"ModelCheckpoint\._no_such_attribute is gone"):
        internals.check_internals()
