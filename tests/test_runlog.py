"""log.jsonl on resume (a line cut by a kill), the optional plot, number formats, the progress display."""

import json
import sys
from io import StringIO

from rich.console import Console

from llmstages.runlog import RunLog, TrainProgress, fmt, plot_losses, summary_table


def test_resume_keeps_lines_up_to_the_checkpoint_and_drops_a_cut_line(tmp_path):
    log = RunLog(tmp_path)
    assert log.records() == []
    log.truncate_after(5)  # no log yet: nothing to do
    for step in (5, 10, 15):
        log.write({"step": step, "loss": step / 10})
    with open(log.path, "a") as f:
        f.write('{"step": 20, "lo')  # the kill cut this line
    assert [r["step"] for r in log.records()] == [5, 10, 15]  # the cut line is skipped when reading
    log.truncate_after(10)
    assert log.path.read_text() == "".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in (5, 10))


def test_plot_is_optional_and_skips_an_empty_log(tmp_path, monkeypatch):
    records = [{"step": 1, "loss": 2.0}, {"step": 1, "val_loss": 2.1, "val_bpb": 3.0}, {"step": 2, "loss": 1.5}]
    assert plot_losses([], tmp_path / "a.png") is None and not (tmp_path / "a.png").exists()
    assert plot_losses(records, tmp_path / "b.png", "run") == tmp_path / "b.png"
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # not installed: the run goes on without a plot
    assert plot_losses(records, tmp_path / "c.png") is None and not (tmp_path / "c.png").exists()


def test_numbers_are_formatted_for_people():
    assert [fmt(None), fmt("x"), fmt(12345), fmt(float("nan")), fmt(float("inf")), fmt(123456.7), fmt(0.000123456)] \
        == ["-", "x", "12,345", "nan", "inf", "123,457", "0.0001235"]
    console = Console(file=StringIO(), width=80)
    console.print(summary_table("t", {"loss": 1.23456, "run": "a"}))
    out = console.file.getvalue()
    assert "1.235" in out and "run" in out


def test_progress_is_a_bar_on_a_terminal_and_lines_in_a_pipe():
    piped = Console(file=StringIO(), width=120)
    progress = TrainProgress(piped, total=10, start=0)
    progress.update(5, {"loss": 2.5, "mfu": None})
    progress.message("eval")
    progress.close()
    assert piped.file.getvalue() == "step 5  loss 2.5\neval\n"
    terminal = Console(file=StringIO(), width=120, force_terminal=True)
    progress = TrainProgress(terminal, total=10, start=2)
    progress.update(10, {"loss": 1.0})
    progress.close()
    assert "10/10" in terminal.file.getvalue() and "loss 1" in terminal.file.getvalue()
    silent = Console(file=StringIO())
    quiet = TrainProgress(silent, total=10, start=0, enabled=False)  # ranks other than 0
    quiet.update(1, {"loss": 1.0})
    quiet.message("x")
    quiet.close()
    assert silent.file.getvalue() == ""
