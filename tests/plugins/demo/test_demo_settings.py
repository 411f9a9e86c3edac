"""A demo folder is reused only under the same settings, including the task's data (size and row order)."""

import json

import pytest

from agl_plugins.demo.run import TASK_ROWS_VERSION, TASKS, DemoOptions, check_settings, settings_of


def test_settings_name_the_task_data_and_refuse_a_folder_of_another_budget(tmp_path):
    opts = DemoOptions(out=tmp_path)
    settings = settings_of(opts)
    assert settings["task_data"] == {"n_train": TASKS["arith"]["n_train"], "n_heldout": TASKS["arith"]["n_heldout"],
                                     "rows_version": TASK_ROWS_VERSION}
    check_settings(opts)
    check_settings(opts)  # the same settings again: accepted
    stored = json.loads((tmp_path / "settings.json").read_text())
    stored["task_data"]["n_train"] = 400  # a folder of the earlier 400-problem demo
    (tmp_path / "settings.json").write_text(json.dumps(stored))
    with pytest.raises(ValueError, match=r"holds a demo run with other settings \(task_data\)"):
        check_settings(opts)
    del stored["task_data"]  # a folder written before the task data were recorded
    (tmp_path / "settings.json").write_text(json.dumps(stored))
    with pytest.raises(ValueError, match="task_data"):
        check_settings(opts)
