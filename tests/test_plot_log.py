"""pahubert-plot-log with several runs: every log drawn under a unique label, losses of different scale
on their own axes, one distinct colour per run."""
import matplotlib
import pytest

from pahubert_plugin import plot_log

matplotlib.use("Agg")


def _json_log(loss, updates=(10, 20, 30), accuracy=True):
    lines = []
    for n in updates:
        extra = f', "correct_m_0": "{0.1 + n / 100:.2f}"' if accuracy else ""
        lines.append(f'[2026-01-01 10:00:0{n % 10},001][train_inner][INFO] - {{"epoch": 1, "loss": "{loss * (1 - n / 100):.4f}"'
                     f'{extra}, "num_updates": "{n}"}}')
    return "\n".join(lines) + "\n"


SEPARATION_LOG = """\
2026-01-01 10:00:01 | INFO | train_inner | epoch 001:     10 / 25 loss=0.031, lr=0.003, num_updates=10
2026-01-01 10:00:01 | INFO | train_inner | epoch 001:     20 / 25 loss=0.027, lr=0.003, num_updates=20
2026-01-01 10:00:02 | INFO | valid | epoch 001 | valid on 'valid' subset | loss 0.029 | sdr 1.5 | num_updates 20
"""


def _recipe_logs(tmp_path, names, text):
    paths = []
    for name in names:
        path = tmp_path / name / "logs" / "hydra" / "hydra_train.log"
        path.parent.mkdir(parents=True)
        path.write_text(text(name) if callable(text) else text)
        paths.append(str(path))
    return paths


def _lines(ax):
    return [line for line in ax.get_lines() if not line.get_label().startswith("_")]


def test_two_recipe_logs_of_one_file_name_are_both_drawn(tmp_path, caplog):
    paths = _recipe_logs(tmp_path, ["a", "b"], lambda name: _json_log(5.0 if name == "a" else 4.0))
    assert plot_log._labels(paths) == ["a/logs/hydra/hydra_train.log", "b/logs/hydra/hydra_train.log"]
    assert plot_log._labels([paths[0], paths[0]]) == ["hydra_train.log", "hydra_train.log #2"]
    assert plot_log._labels([str(tmp_path / "x" / "train.log"), str(tmp_path / "y" / "valid.log")]) == \
        ["train.log", "valid.log"]
    out = tmp_path / "curves.png"
    with caplog.at_level("INFO"):
        assert plot_log.main([*paths, "-o", str(out)]) == 0
    assert out.is_file()
    logs = {label: plot_log.read_log(p) for p, label in zip(paths, plot_log._labels(paths))}
    assert len(logs) == 2
    fig, titles = plot_log.figure(logs)
    assert titles == ["loss", "masked accuracy"]
    labels = {line.get_label() for ax in fig.axes for line in _lines(ax)}
    assert {"a/logs/hydra/hydra_train.log train_inner", "b/logs/hydra/hydra_train.log train_inner"} <= labels


def test_losses_of_different_scale_get_their_own_axes(tmp_path):
    pre = _recipe_logs(tmp_path / "pre", ["pretrain"], _json_log(5.0))
    ft = _recipe_logs(tmp_path / "ft", ["musdb"], SEPARATION_LOG)
    paths = pre + ft
    logs = {label: plot_log.read_log(p) for p, label in zip(paths, plot_log._labels(paths))}
    fig, titles = plot_log.figure(logs)
    loss_axes = [ax for ax, t in zip(fig.axes, titles) if t.startswith("loss")]
    assert len(loss_axes) == 2, titles
    assert titles[0] == "loss (musdb/logs/hydra/hydra_train.log)", titles
    for ax, run in zip(loss_axes, ["musdb", "pretrain"]):
        assert {line.get_label().split(" ")[0].rsplit("/logs", 1)[0] for line in _lines(ax)} == {run}
    # losses of one scale share one axis
    same = {"a": plot_log.read_log(pre[0]), "b": plot_log.read_log(pre[0])[:2]}
    assert plot_log.figure(same)[1] == ["loss", "masked accuracy"]


@pytest.mark.parametrize("runs", [3, 12, 25])
def test_every_run_has_its_own_colour(tmp_path, runs):
    names = [f"run{i:02d}" for i in range(runs)]
    paths = _recipe_logs(tmp_path, names, lambda name: _json_log(5.0 + int(name[3:]) / 10))
    logs = {label: plot_log.read_log(p) for p, label in zip(paths, plot_log._labels(paths))}
    fig, titles = plot_log.figure(logs)
    for ax in fig.axes:
        colours = [matplotlib.colors.to_hex(line.get_color()) for line in _lines(ax)]
        assert len(colours) == runs and len(set(colours)) == runs, titles
