"""The command line of both scripts: what --help shows (main usage, defaults, a help text for every flag)."""
import argparse
import os
import subprocess
import sys

import pytest

import cosmos_dfd
import tiny_wan
import wan_dfd
from dfd_video.cli import SUBCOMMANDS, build_parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"wan_dfd.py": (wan_dfd.WanAdapter, wan_dfd.__doc__), "cosmos_dfd.py": (cosmos_dfd.CosmosAdapter, cosmos_dfd.__doc__)}


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_has_help(script):
    adapter, doc = SCRIPTS[script]
    subs = subparsers(build_parser(adapter(), doc))
    assert set(subs) == set(SUBCOMMANDS)
    missing = [f"{cmd} {a.option_strings[0]}" for cmd, p in subs.items() for a in p._actions
               if a.option_strings and not (a.help or "").strip()]
    assert not missing, missing


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_main_usage_and_defaults(script, capsys):
    top = subprocess.run([sys.executable, script, "--help"], env=tiny_wan.quiet_env(), capture_output=True, text=True,
                         cwd=ROOT)  # the script as users run it; the subcommands' help in-process
    assert top.returncode == 0
    assert f"torchrun --nproc_per_node=N {script} --model-dir DIR --data DIR --dmd2-ckpt CKPT" in top.stdout
    assert "no subcommand: train" in top.stdout and "Conventions" not in top.stdout
    main = {"wan_dfd.py": wan_dfd.main, "cosmos_dfd.py": cosmos_dfd.main}[script]

    def run(*argv) -> str:
        with pytest.raises(SystemExit) as e:
            main(list(argv))
        assert e.value.code == 0
        return capsys.readouterr().out
    train = run("train", "--help")
    for flag, default in (("--p", "0.5"), ("--iterations", "100" if script == "wan_dfd.py" else "300"),
                          ("--save-every", "50"), ("--keep", "2"), ("--out", "runs/dfd"), ("--gan-weight", "0.0")):
        block = train.split(f"  {flag} ")[1].split("\n  --")[0]
        assert f"(default: {default})" in " ".join(block.split()), (flag, block)
    assert "(default: None)" not in train and "(default: False)" not in train
    assert "(default: 0.0)" in " ".join(train.split("  --ema ")[1].split("\n  --")[0].split())  # 0 is a default too
    assert " train [-h]" in train
    sample = " ".join(run("sample", "--help").split())
    assert "frames per video (4k + 1) (default: 81)" in sample and "(default: 16.0)" in sample


def test_the_method_path_imports_no_optional_layer():
    """Importing the scripts, building train's parser and importing the drivers of the method path loads no module
    of the evaluation or planning layers (their own subcommands import them)."""
    code = ("import sys, wan_dfd, cosmos_dfd, dfd_video.train, dfd_video.sample, dfd_video.export, dfd_video.prepare\n"
            "from dfd_video.cli import build_parser\n"
            "build_parser(wan_dfd.WanAdapter(), cmd='train').parse_args(['train', '--model-dir', '.', '--data', '.'])\n"
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('dfd_video'))))")
    r = subprocess.run([sys.executable, "-c", code], env=tiny_wan.quiet_env(), capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    loaded = r.stdout.split()
    assert "dfd_video.train" in loaded and not [m for m in loaded if m.startswith(("dfd_video.evaluation",
                                                                                  "dfd_video.planning"))], loaded
