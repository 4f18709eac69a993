"""The CLI: help on every verb, one style, errors that name what to fix."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from mixmodal.cli import build_parser, main


def _verbs(parser, prefix=()):
    """Yield every (verb, subverb, ...) path of the parser."""
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            for name, sub in action.choices.items():
                yield prefix + (name,)
                yield from _verbs(sub, prefix + (name,))


def test_every_verb_has_help(capsys):
    paths = list(_verbs(build_parser()))
    assert ("data", "shapes") in paths and ("tokenizer", "train") in paths
    for path in paths:
        with pytest.raises(SystemExit) as e:
            main([*path, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert "usage: mixmodal " + " ".join(path) in out, path


def test_console_script_entry_point():
    proc = subprocess.run([sys.executable, "-m", "mixmodal.cli", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("mixmodal ")


def test_shapes_then_stats_show_and_tokenizer(tmp_path, capsys):
    data = tmp_path / "d"
    assert main(["data", "shapes", "--num", "12", "--resolution", "32", "--out", str(data), "--quiet", "max_objects=2"]) == 0
    resolved = yaml.safe_load((data / "config.yaml").read_text())
    assert resolved["shapes"]["max_objects"] == 2 and resolved["shapes"]["resolution"] == 32 and resolved["num"] == 12
    assert sum(1 for _ in open(data / "documents.jsonl")) == 12

    assert main(["data", "show", str(data), "--num", "8", "--out", str(tmp_path / "sheet.png")]) == 0
    assert (tmp_path / "sheet.png").stat().st_size > 0

    assert main(["tokenizer", "train", str(data), "--vocab-size", "300", "--out", str(tmp_path / "tok")]) == 0
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
    assert yaml.safe_load((tmp_path / "tok" / "config.yaml").read_text())["text_tokenizer"]["vocab_size"] == 300
    capsys.readouterr()

    assert main(["data", "stats", str(data), "--tokenizer", str(tmp_path / "tok"), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["documents"] == 12 and stats["text_tokens_total"] > 0 and stats["bad_input"] == {}


def test_wds_format(tmp_path):
    out = tmp_path / "w"
    assert main(["data", "shapes", "--num", "7", "--resolution", "32", "--format", "wds", "--shard-size", "3",
                 "--out", str(out), "--quiet"]) == 0
    assert len(list(out.glob("*.tar"))) == 3


def test_bad_override_is_reported_with_its_key(tmp_path, capsys):
    code = main(["data", "shapes", "--num", "1", "--out", str(tmp_path), "max_objcts=2"])
    assert code == 2
    err = capsys.readouterr().err
    assert "max_objcts: unknown key (did you mean 'max_objects'?)" in err


def test_unknown_flag_and_missing_source(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["data", "stats", "shapes", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    assert main(["data", "stats", str(tmp_path / "nowhere.jsonl")]) == 2
    assert "nowhere.jsonl" in capsys.readouterr().err
