"""`plot`: a run's metrics.jsonl (and probes.jsonl) over steps as one PNG."""
import json

import matplotlib.image
import pytest

import wan_dfd
from dfd_video.evaluation.plot import read_series


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_series_keep_steps_and_skip_bookkeeping(tmp_path):
    write_jsonl(tmp_path / "m.jsonl", [{"step": 0, "loss_student": 1.0, "lr": 1e-5, "dfd": 1.0},
                                       {"step": 1, "loss_student": 0.5, "lr": 1e-5, "dfd": 0.0, "teacher_gap": 0.25}])
    s = read_series(str(tmp_path / "m.jsonl"))
    assert s == {"loss_student": ([0, 1], [1.0, 0.5]), "dfd": ([0, 1], [1.0, 0.0]), "teacher_gap": ([1], [0.25])}


def test_plot_writes_one_png_with_every_series(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    write_jsonl(run / "metrics.jsonl", [{"step": k, "loss_student": 1.0 / (k + 1), "loss_fake": 0.1, "delta2": 0.3,
                                         "extra_key": k, "samples": 16 * k} for k in range(5)])
    write_jsonl(run / "probes.jsonl", [{"step": 4, "saturation": 0.2}])
    out = wan_dfd.main(["plot", "--run", str(run)])
    assert out == str(run / "metrics.png")
    img = matplotlib.image.imread(out)
    assert img.shape[1] >= 1200 and img.shape[0] >= 250  # 5 panels: loss_student, loss_fake, delta2, extra_key, probe/
    from dfd_video.evaluation.plot import plot_run
    assert plot_run(str(run), str(tmp_path / "p.png")) == ["loss_student", "loss_fake", "delta2", "extra_key",
                                                          "probe/saturation"]


def test_plot_bad_input_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match=r"--run .*: no metrics.jsonl"):
        wan_dfd.main(["plot", "--run", str(tmp_path)])
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "loss_student": 1}\nnot json\n')
    with pytest.raises(SystemExit, match=r"metrics.jsonl:2: not a metrics line"):
        wan_dfd.main(["plot", "--run", str(tmp_path)])
