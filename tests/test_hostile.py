"""Nothing overwritten, mixed or lost (issue 20): the cases a hostile run of wan_dfd.py found, each as a test on the
tiny Wan. Every bad input, full disk, Ctrl-C or corrupt file ends in one line naming the file or flag; nothing a user
made is overwritten or mixed. In-process (wan_dfd.main) where the behaviour allows; a full disk is this process's
file-size limit (RLIMIT_FSIZE: writes fail with EFBIG, as on a full disk with ENOSPC); a real Ctrl-C and two
concurrent runs are the slow test at the end, torchrun's report is tests/test_wan_dist.py's."""
import contextlib
import errno
import glob
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import cosmos_dfd
import tiny_wan
import wan_dfd
import dfd_video.files
import dfd_video.runs
import dfd_video.train
import dfd_video.video
from dfd_video.cli import RULES

torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "wan_dfd.py")
SIZE = ["--num-frames", "9", "--height", "32", "--width", "48", "--fps", "8"]


def train_argv(s, out, *more):
    return ["train", "--model-dir", s["pipe"], "--data", s["data"], "--dmd2-ckpt", s["dmd2"], "--out", str(out),
            "--device", "cpu", "--batch-size", "1", "--fake-updates", "0", "--monitor-every", "0", "--steps", "2",
            "--save-every", "1", *more]


@pytest.fixture(scope="module")
def s(tmp_path_factory):
    """The tiny pipeline, random prepared data, a DMD2 .safetensors and one finished 2-step run (checkpoints after
    steps 0 and 1), shared by the cases that read them; cases that change a run work on a copy."""
    root = tmp_path_factory.mktemp("hostile")
    out = {"root": root, "pipe": tiny_wan.cached_pipeline(), "data": str(root / "data"),
           "dmd2": str(root / "dmd2.safetensors"), "run": str(root / "run")}
    tiny_wan.random_data(out["data"])
    save_file(tiny_wan.tiny_transformer(5).state_dict(), out["dmd2"])
    wan_dfd.main(train_argv(out, out["run"]))
    (root / "prompts.txt").write_text("a red ball rolls left\n")
    out["prompts"] = str(root / "prompts.txt")
    return out


def main_error(argv, main=wan_dfd.main) -> str:
    """The one line a refused command exits with (SystemExit's message), checked to be one line."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    msg = str(e.value.code)
    assert "\n" not in msg and msg.startswith("error: "), msg
    return msg


def copy_run(s, tmp_path) -> str:
    dst = str(tmp_path / "run")
    shutil.copytree(s["run"], dst)
    return dst


def digest(folder) -> dict:
    return {os.path.relpath(f, folder): hashlib.sha256(open(f, "rb").read()).hexdigest()
            for f in glob.glob(f"{folder}/**/*", recursive=True) if os.path.isfile(f)}


@contextlib.contextmanager
def disk_full_at(nbytes: int, capfd):
    """Writes past `nbytes` into any file fail with EFBIG (what a full disk does with ENOSPC), for this process.
    The captured output is emptied first: pytest's own capture file obeys the limit too."""
    capfd.readouterr()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


# ---------------------------------------------------------------------------------------------------
# export: never into --model-dir, never over a user's folder, never half-written


def test_export_never_writes_into_the_model_folder(s, tmp_path):
    before = digest(s["pipe"])
    for out in (os.path.join(s["pipe"], "transformer"), os.path.join(s["pipe"], "student")):
        msg = main_error(["export", "--model-dir", s["pipe"], "--ckpt", s["run"], "--out", out])
        assert re.fullmatch(rf"error: --out {re.escape(out)}: inside --model-dir {re.escape(s['pipe'])}; .*", msg), msg
    assert "holds --model-dir" in main_error(["export", "--model-dir", s["pipe"], "--ckpt", s["run"], "--out",
                                              os.path.dirname(s["pipe"])])
    assert digest(s["pipe"]) == before and not os.path.exists(os.path.join(s["pipe"], "student"))


def test_export_refuses_a_non_empty_out_and_overwrite_moves_it_aside(s, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    argv = ["export", "--model-dir", s["pipe"], "--ckpt", s["run"], "--out", str(out)]
    msg = main_error(argv)
    assert re.fullmatch(rf"error: --out {re.escape(str(out))} is not empty \(notes.txt\): pass --overwrite .*", msg)
    assert os.listdir(out) == ["notes.txt"]
    capsys.readouterr()
    wan_dfd.main([*argv, "--overwrite"])
    aside = glob.glob(f"{out}.old-*")
    assert len(aside) == 1 and open(os.path.join(aside[0], "notes.txt")).read() == "my notes"
    assert f"--overwrite: moved the earlier {out} to {aside[0]}" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "diffusion_pytorch_model.safetensors"]  # + the card


def test_overwrite_never_moves_the_working_directory(s, tmp_path, monkeypatch):
    """export's and train's --overwrite move the earlier folder aside; not when it holds the working directory."""
    run = copy_run(s, tmp_path)
    before = digest(run)
    monkeypatch.chdir(os.path.join(run, "checkpoints"))
    line = f"error: --overwrite: --out {run} holds the working directory, which cannot be moved aside"
    assert main_error(train_argv(s, run, "--overwrite")) == line
    assert main_error(["export", "--model-dir", s["pipe"], "--ckpt", s["run"], "--out", run, "--overwrite"]) == line
    assert digest(run) == before


def test_export_on_a_full_disk_leaves_nothing_behind(s, tmp_path, capfd):
    out = str(tmp_path / "exp")
    with disk_full_at(50_000, capfd):  # config.json fits, the 98 kB of weights do not
        msg = main_error(["export", "--model-dir", s["pipe"], "--ckpt", s["run"], "--out", out])
    assert re.fullmatch(rf"error: could not write {re.escape(out)}: file too large \(.*\); [\d.]+ GB free on the "
                        r"disk mounted at /\S*", msg), msg
    assert os.listdir(tmp_path) == []  # no --out, no 0-byte config.json, no temporary folder


# ---------------------------------------------------------------------------------------------------
# train: one run per folder; --resume does not mix configurations; no checkpoint of NaN weights


def test_a_run_folder_is_locked_while_a_run_owns_it(s, tmp_path, capsys):
    """A second run into a folder a live run holds is refused with the owner's pid and host; a lock whose process
    is gone is taken over with a line (test_ctrl_c_in_train_says_where_it_stopped: the lock is held while training)."""
    out = tmp_path / "run"
    out.mkdir()
    owner = subprocess.Popen(["sleep", "60"])
    try:
        (out / "run.lock").write_text(json.dumps({"pid": owner.pid, "host": socket.gethostname(), "since": "now"}))
        msg = main_error(train_argv(s, out))
        assert re.fullmatch(rf"error: --out {re.escape(str(out))} is in use by another run: pid {owner.pid} on "
                            rf"{re.escape(socket.gethostname())}, since now; wait .*", msg), msg
        assert os.listdir(out) == ["run.lock"]  # nothing else was written or cleaned
        (out / "run.lock").write_text(json.dumps({"pid": owner.pid, "host": "elsewhere", "since": "now"}))
        assert f"pid {owner.pid} on elsewhere" in main_error(train_argv(s, out))  # cannot be checked: refused
    finally:
        owner.kill()
        owner.wait()
    (out / "run.lock").write_text(json.dumps({"pid": owner.pid, "host": socket.gethostname(), "since": "now"}))
    capsys.readouterr()
    dfd_video.runs.lock_run_folder(str(out))  # what train does first (claim_run_folder): a dead owner's lock is taken
    assert capsys.readouterr().err == (f"--out {out}: took over the lock of an earlier run (pid {owner.pid} is no "
                                       "longer running)\n")
    assert json.load(open(out / "run.lock"))["pid"] == os.getpid()
    dfd_video.runs.release_run_locks()  # what every command does last
    assert os.listdir(out) == []
    # a run that finished in the folder after this one's flags were checked: seen again once the lock is held
    (out / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"already holds a run \(metrics.jsonl\): pass --resume"):
        dfd_video.runs.claim_run_folder(str(out), overwrite=False)
    dfd_video.runs.release_run_locks()
    assert os.listdir(out) == ["metrics.jsonl"]


def test_resume_refuses_changed_method_flags_and_records_allowed_changes(s, tmp_path, capsys):
    run = copy_run(s, tmp_path)
    before = digest(run)
    other = tmp_path / "other_data"
    tiny_wan.random_data(other, seed=1)
    msg = main_error(train_argv(s, run, "--resume", "--p", "0", "--guidance", "2", "--fake-updates", "4"))
    assert re.fullmatch(r"error: --resume \S+/step-000001: this command changes what the run computes: --fake-updates "
                        r"4 \(the checkpoint's: 0\); --guidance 2.0 \(the checkpoint's: 5.0\); --p 0.0 \(the "
                        r"checkpoint's: 0.5\)\. Resume with the checkpoint's flags, or pass --allow-changes .*", msg), msg
    argv = train_argv(s, run, "--resume", "--steps", "3")
    msg = main_error([*argv[:argv.index("--data") + 1], str(other), *argv[argv.index("--data") + 2:]])
    assert re.search(rf"--data {re.escape(str(other))} \(the checkpoint's: {re.escape(s['data'])}\)", msg), msg
    assert digest(run) == before  # refused before anything was written
    capsys.readouterr()
    wan_dfd.main([*argv, "--p", "0", "--allow-changes"])
    err = capsys.readouterr().err
    assert (f"--resume: continuing from {run}/checkpoints/step-000001 (saved after student step 1) at student step 2"
            "; changed: --p\n") in err
    assert json.load(open(f"{run}/args.json"))["p"] == 0.5  # the flags the run started with, not rewritten
    segments = [json.loads(x) for x in open(f"{run}/segments.jsonl")]
    assert [(x["start_step"], x["args"]["p"], x["changes"]) for x in segments] == [(0, 0.5, {}), (2, 0.0, {"p": [0.5, 0.0]})]
    assert segments[1]["resumed_from"] == f"{run}/checkpoints/step-000001"


def test_absurd_flag_values_are_refused_with_the_reason(s, tmp_path):
    cases = [(["--lr", "inf"], r"--lr inf: must be a finite number > 0 and < 1 \(AdamW"),
             (["--lr", "1e30"], r"--lr 1e\+30: must be a finite number > 0 and < 1"),
             (["--lr-fake", "nan"], r"--lr-fake nan: must be a finite number > 0 and < 1"),
             (["--guidance", "0"], r"--guidance 0.0: must be a finite number > 0 \(.*g = 0 the negative prompt alone"),
             (["--guidance", "-1"], r"--guidance -1.0: must be a finite number > 0"),
             (["--t-shift", "0"], r"--t-shift 0.0: must be a finite number > 0 \(1: no shift"),
             (["--t-shift", "-1"], r"--t-shift -1.0: must be a finite number > 0"),
             (["--allow-changes"], r"--allow-changes needs --resume")]
    for more, want in cases:
        assert re.search(want, main_error(train_argv(s, tmp_path / "r", *more))), more
    assert not (tmp_path / "r").exists()


def test_non_finite_weights_are_never_saved_nor_sampled(s, tmp_path, monkeypatch, capsys):
    """--lr inf (let through the flag rule for this test) turns every weight into inf / NaN at the first step, while
    that step's loss is still finite: the checkpoint after it is refused. A checkpoint whose weights are NaN (here
    written by hand) is refused by sample and export."""
    monkeypatch.delitem(RULES, "lr")
    out = tmp_path / "diverged"
    msg = main_error(train_argv(s, out, "--lr", "inf", "--steps", "3"))
    assert re.fullmatch(r"error: training stopped: after student step 0 the student weights hold NaN or inf \(\d+ of "
                        r"\d+ tensors, e\.g\. \S+\), so this step was not saved; no checkpoint was written \(.*\)", msg)
    assert not glob.glob(f"{out}/checkpoints/step-*")
    run = copy_run(s, tmp_path)
    student = f"{run}/checkpoints/step-000001/student.safetensors"
    save_file({k: torch.full_like(v, float("nan")) for k, v in load_file(student).items()}, student)
    samples, exported = str(tmp_path / "samples"), str(tmp_path / "exp")
    for argv in (["sample", "--prompts", s["prompts"], "--out", samples, *SIZE, "--device", "cpu"],
                 ["export", "--out", exported]):
        msg = main_error([*argv, "--model-dir", s["pipe"], "--ckpt", run])
        assert re.fullmatch(rf"error: --ckpt {re.escape(run)}: \d+ of \d+ weight tensors hold NaN or inf .*", msg), msg
    assert not os.path.exists(exported) and not glob.glob(f"{samples}/*.mp4")


# ---------------------------------------------------------------------------------------------------
# prepare: the script's model family, and one bad caption or clip skips that clip alone


def test_prepare_refuses_another_models_folder_before_encoding(s, tmp_path):
    fake = tmp_path / "cosmos"  # the tiny Wan folder relabelled as Cosmos: only the names say what it is
    shutil.copytree(s["pipe"], fake)
    for file, key, name in (("model_index.json", "transformer", ["diffusers", "CosmosTransformer3DModel"]),
                            ("transformer/config.json", "_class_name", "CosmosTransformer3DModel")):
        cfg = json.load(open(fake / file))
        cfg[key] = name
        (fake / file).write_text(json.dumps(cfg))
    videos = tmp_path / "videos"
    tiny_wan.make_videos(str(videos), n=1)
    prep = ["prepare", "--videos", str(videos), "--out", str(tmp_path / "data"), *SIZE, "--device", "cpu"]
    msg = main_error([*prep, "--model-dir", str(fake)])
    assert re.fullmatch(rf"error: --model-dir {re.escape(str(fake))}: its model_index.json names a "
                        r"CosmosTransformer3DModel, but this script is for Wan models \(WanTransformer3DModel\); use the "
                        r"script of that model", msg), msg
    assert "names a WanTransformer3DModel, but this script is for Cosmos-Predict2.5 models" in \
        main_error([*prep, "--model-dir", s["pipe"]], cosmos_dfd.main)
    assert not (tmp_path / "data").exists()


def test_prepare_skips_a_bad_caption_or_a_short_clip_alone(s, tmp_path, capsys):
    videos = tmp_path / "videos"
    tiny_wan.make_videos(str(videos), n=3)
    (videos / "clip01.txt").write_text("  \n")
    (videos / "clip02.txt").write_bytes(b"a red caf\xe9\n")
    tiny_wan.write_video(str(videos / "short.mp4"), tiny_wan.synthetic_frames(0, 1, 40, 56), 8)
    (videos / "short.txt").write_text("a red ball")
    capsys.readouterr()
    m = wan_dfd.main(["prepare", "--model-dir", s["pipe"], "--videos", str(videos), "--out", str(tmp_path / "data"),
                      *SIZE, "--device", "cpu"])
    assert m["count"] == 1
    why = {os.path.basename(x["file"]): x["reason"] for x in m["skipped"]}
    assert why == {"clip01.mp4": f"empty caption file {videos}/clip01.txt",
                   "clip02.mp4": f"{videos}/clip02.txt: line 1 is not UTF-8 text (byte 0xe9); save the file as UTF-8",
                   "short.mp4": f"{videos}/short.mp4: too short (1 of 9 frames at 8 fps)"}, why
    assert "prepared 1 samples in 1 shards" in capsys.readouterr().err


def test_caption_tables_and_prompts_files_name_the_bad_line(s, tmp_path):
    folder = tmp_path / "v"
    folder.mkdir()
    (folder / "captions.csv").write_bytes(b"video,caption\na.mp4,a red ball\nb.mp4,caf\xe9 au lait\nc.mp4,\n")
    got = dfd_video.video.list_videos(str(folder))
    assert [(os.path.basename(v), c, w) for v, c, w in got] == [
        ("a.mp4", "a red ball", None), ("b.mp4", "", f"{folder}/captions.csv row 2 is not UTF-8 text (byte 0xe9)"),
        ("c.mp4", "", f"no caption in {folder}/captions.csv row 3")]
    os.remove(folder / "captions.csv")
    (folder / "captions.jsonl").write_bytes(b'{"video": "a.mp4", "caption": "caf\xe9"}\n{"video": "b.mp4", "caption": "ok"}\n')
    assert [w for _, _, w in dfd_video.video.list_videos(str(folder))] == [
        f"{folder}/captions.jsonl row 1 is not UTF-8 text (byte 0xe9)", None]
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"a red ball\ncaf\xe9\n")
    msg = main_error(["sample", "--model-dir", s["pipe"], "--ckpt", s["run"], "--prompts", str(prompts), "--out",
                      str(tmp_path / "samples"), *SIZE, "--device", "cpu"])
    assert msg == f"error: {prompts}: line 2 is not UTF-8 text (byte 0xe9); save the file as UTF-8", msg


# ---------------------------------------------------------------------------------------------------
# corrupt or hostile files: one line naming the file, and a pickled object never runs


class RunsCode:
    def __init__(self, flag):
        self.flag = flag

    def __reduce__(self):
        return os.system, (f"touch {self.flag}",)


def test_unreadable_weight_files_are_one_line_naming_them(s, tmp_path, capsys):
    ran = tmp_path / "code_ran"
    net = tiny_wan.tiny_transformer(5).state_dict()
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "garbage.pt").write_bytes(b"garbage" * 100)
    torch.save({"x": RunsCode(str(ran))}, tmp_path / "pickled.pt")
    torch.save({"net": net, "callback": RunsCode(str(ran))}, tmp_path / "mixed.pth")
    stem = tiny_wan.write_fastgen_fsdp(str(tmp_path / "fastgen"), 100, {"net": tiny_wan.tiny_transformer(5),
                                                                       "fake_score": tiny_wan.tiny_transformer(6)})
    distcp = sorted(glob.glob(f"{stem}.net_model/*.distcp"))[0]
    data = open(distcp, "rb").read()
    open(distcp, "wb").write(data[:len(data) // 2])
    cases = [("empty.pt", r"empty or truncated file$"),
             ("garbage.pt", r"not a torch checkpoint: neither a torch.save zip file nor a legacy pickle of tensors$"),
             ("pickled.pt", r"holds a pickled Python object \(\w+\.system\), which is never loaded here because "
                            r"unpickling can run any code; re-save the tensors alone"),
             ("mixed.pth", r"holds a pickled Python object \(\w+\.system\).*A FastGen <iteration>.pth holds no "
                           r"weights: its networks are the folders")]
    for name, want in cases:
        msg = main_error(train_argv(s, tmp_path / "r", "--dmd2-ckpt", str(tmp_path / name)))
        assert re.fullmatch(rf"error: {re.escape(str(tmp_path / name))}: cannot read weights: {want}.*", msg), msg
        assert "weights_only" not in msg  # torch's advice to unpickle is wrong advice for a file that may be hostile
    want = (rf"{re.escape(stem)}.net_model: cannot read weights: __0_0.distcp is truncated: {len(data) // 2} bytes, "
            rf"its .metadata needs {len(data)}; copy the folder again")
    assert re.fullmatch(f"error: {want}", main_error(train_argv(s, tmp_path / "r", "--dmd2-ckpt", stem + ".pth")))
    capsys.readouterr()
    main_error(["check", "--model-dir", s["pipe"], "--dmd2-ckpt", stem + ".pth", "--device", "cpu"])
    assert re.search(f"\nproblem: student: {want}\n", capsys.readouterr().out), "check lists it as one problem"
    assert not ran.exists()


def test_a_corrupt_checkpoint_file_in_a_run_folder_is_named(s, tmp_path):
    run = copy_run(s, tmp_path)
    student = f"{run}/checkpoints/step-000001/student.safetensors"
    open(student, "r+b").truncate(1000)
    for argv in (["sample", "--prompts", s["prompts"], "--out", str(tmp_path / "samples"), *SIZE, "--device", "cpu"],
                 ["export", "--out", str(tmp_path / "exp")]):
        msg = main_error([*argv, "--model-dir", s["pipe"], "--ckpt", run])
        assert msg.startswith(f"error: {student}: corrupt training checkpoint ("), msg


# ---------------------------------------------------------------------------------------------------
# full disk, Ctrl-C, torchrun: the shared wrapper's lines


def test_a_full_disk_is_one_line_in_prepare_sample_and_train(s, tmp_path, capfd):
    videos = tmp_path / "videos"
    tiny_wan.make_videos(str(videos), n=1)
    data = tmp_path / "data"
    with disk_full_at(20_000, capfd):  # the first shard (66 kB) does not fit
        msg = main_error(["prepare", "--model-dir", s["pipe"], "--videos", str(videos), "--out", str(data), *SIZE,
                          "--device", "cpu", "--per-shard", "1"])
    assert re.fullmatch(rf"error: could not write {re.escape(str(data))}/shard-r00-00000.safetensors: file too large "
                        r"\(.*\); [\d.]+ GB free on the disk mounted at /\S*", msg), msg
    assert not glob.glob(f"{data}/*.tmp*") and not glob.glob(f"{data}/shard-*")
    samples = tmp_path / "samples"
    with disk_full_at(1_000, capfd):  # an mp4 of 9 frames does not fit
        msg = main_error(["sample", "--model-dir", s["pipe"], "--ckpt", s["run"], "--prompts", s["prompts"], "--out",
                          str(samples), *SIZE, "--device", "cpu"])
    assert msg.startswith(f"error: could not write {samples}/prompt000_seed0.mp4: file too large ("), msg
    assert os.listdir(samples) == []
    out = tmp_path / "run"
    with disk_full_at(200_000, capfd):  # the weights (98 kB each) fit, state.pt (480 kB) does not
        msg = main_error(train_argv(s, out, "--steps", "1"))
    assert msg.startswith(f"error: could not write {out}/checkpoints/step-000000: file too large ("), msg
    assert os.listdir(out / "checkpoints") == []


def test_ctrl_c_in_train_says_where_it_stopped(s, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real = dfd_video.train.Progress.step_end

    held = []

    def ctrl_c_after_step_1(self, step):
        held.append(json.load(open(out / "run.lock"))["pid"] if (out / "run.lock").exists() else None)
        real(self, step)
        if step == 1:
            raise KeyboardInterrupt
    monkeypatch.setattr(dfd_video.train.Progress, "step_end", ctrl_c_after_step_1)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        wan_dfd.main(train_argv(s, out, "--steps", "4"))
    assert e.value.code == 130
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: interrupted (Ctrl-C) after student step 1 (counted from 0); the last checkpoint, "
        f"{out}/checkpoints/step-000001, continues: add --resume to the same command")
    assert held == [os.getpid()] * 2 and not (out / "run.lock").exists()  # held while training, released at the end
    # Ctrl-C while the networks load: the --out this run created is removed again, empty
    monkeypatch.setattr(dfd_video.train, "build_networks", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(SystemExit) as e:
        wan_dfd.main(train_argv(s, tmp_path / "new"))
    assert e.value.code == 130 and not (tmp_path / "new").exists()
    assert capsys.readouterr().err.splitlines()[-1] == ("error: interrupted (Ctrl-C) before the first student step; "
                                                        "nothing was written")


def test_error_lines_for_every_os_error(tmp_path):
    line = dfd_video.files.error_line
    assert line(OSError(errno.EACCES, "Permission denied", "/x/y")) == "/x/y: permission denied"
    assert line(OSError(errno.ENOENT, "No such file or directory", "/x/y")) == "/x/y: No such file or directory"
    assert re.fullmatch(rf"could not write {tmp_path}/f: no space left on device; [\d.]+ GB free on the disk mounted "
                        r"at /\S*", line(OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "f"))))


def test_under_torchrun_the_reports_root_cause_is_the_line(s, tmp_path, monkeypatch):
    """torchrun prints its own report after a rank fails; with the rank's line in TORCHELASTIC_ERROR_FILE, that
    report (torch's own formatting, read back here) ends with the same line, not with a pointer to its docs."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
    err = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(err))
    msg = main_error(train_argv(s, tmp_path / "r", "--p", "2"))
    report = ChildFailedError("wan_dfd.py", {0: ProcessFailure(0, 1234, 1, str(err))}).format_msg()
    assert f"  traceback : {msg}\n" in report and "To enable traceback" not in report, report


# ---------------------------------------------------------------------------------------------------
# the same with real processes (slow)


@pytest.mark.slow
def test_real_ctrl_c_and_two_concurrent_runs(s, tmp_path):
    """SIGINT to a training process after its first checkpoint: the last line says where to resume, status 130.
    Two runs started at once into one --out: one trains, the other is refused naming the first's pid."""
    out = str(tmp_path / "run")
    cmd = [sys.executable, SCRIPT, *train_argv(s, out, "--steps", "200")]
    proc = subprocess.Popen(cmd, env=tiny_wan.quiet_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while not os.path.exists(os.path.join(out, "checkpoints", "latest")) and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, err
    assert re.fullmatch(r"error: interrupted \(Ctrl-C\) after student step \d+ \(counted from 0\); the last "
                        r"checkpoint, \S+/step-\d{6}, continues: add --resume to the same command",
                        err.strip().splitlines()[-1]), err[-2000:]
    both = str(tmp_path / "both")
    procs = [subprocess.Popen([sys.executable, SCRIPT, *train_argv(s, both, "--steps", "3")], env=tiny_wan.quiet_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 1], results
    refused = next(e for rc, e in results if rc == 1).strip().splitlines()[-1]
    winner = next(p for p, (rc, _) in zip(procs, results) if rc == 0)
    assert re.fullmatch(rf"error: (--out {re.escape(both)} is in use by another run: pid {winner.pid} on .*|--out "
                        rf"{re.escape(both)} already holds a run .*)", refused), refused
