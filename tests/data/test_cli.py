"""oxford-ir-data: each subcommand through main([...]), exit statuses, one-line errors, and one real subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from oxford_ir.benchmarks.download import COMPLETE_MARKER
from oxford_ir.cli.data import main
from tests.benchmarks.http_server import FileServer
from tests.benchmarks.test_download import IMAGES, fake_oxford, tree
from tests.benchmarks.test_verify import write_benchmark

REPO = Path(__file__).resolve().parents[2]


def test_download_command(server: FileServer, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sources = fake_oxford(server, tmp_path)
    argv = ["download", "oxford5k", "--root", str(tmp_path / "data"), "--sources", str(sources), "--no-progress"]
    assert main([*argv, "--keep-archives"]) == 0
    folder = tmp_path / "data" / "oxford5k"
    assert f"oxford5k: complete in {folder}" in capsys.readouterr().out
    assert tree(folder / "jpg") == IMAGES and (folder / COMPLETE_MARKER).is_file()
    assert (folder / "images.tgz").is_file()  # --keep-archives


def test_download_errors_are_one_line_and_exit_2(server: FileServer, tmp_path: Path, capsys) -> None:
    sources = fake_oxford(server, tmp_path)
    del server.files["gnd_oxford5k.pkl"]
    with pytest.raises(SystemExit) as exit_info:
        main(["download", "oxford5k", "--root", str(tmp_path), "--sources", str(sources), "--no-progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: HTTP 404") and f"{server.url}/gnd_oxford5k.pkl" in err[-1]
    assert "Traceback" not in "\n".join(err)

    with pytest.raises(SystemExit) as exit_info:
        main(["download", "paris6k", "--root", str(tmp_path), "--sources", str(tmp_path / "absent.yaml")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: sources file not found: {tmp_path / 'absent.yaml'}; " + (
        "pass an existing YAML file to --sources"
    )


def test_download_base_url_mirror(server: FileServer, tmp_path: Path) -> None:
    fake_oxford(server, tmp_path)
    sources = tmp_path / "elsewhere.yaml"
    sources.write_text("files:\n  - {url: http://unreachable.invalid/gnd_oxford5k.pkl, filename: gnd_oxford5k.pkl}\n")
    argv = ["-q", "download", "roxford5k", "--root", str(tmp_path), "--sources", str(sources)]
    assert main([*argv, "--base-url", server.url, "--no-progress"]) == 0
    assert (tmp_path / "oxford5k" / "gnd_oxford5k.pkl").read_bytes() == server.files["gnd_oxford5k.pkl"]


def test_verify_command_exit_statuses(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_benchmark(tmp_path / "oxford5k")  # one missing and two undecodable images
    assert main(["verify", "oxford5k", "--root", str(tmp_path), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "missing: 1 database, 0 query" in out and "undecodable: 2 of 5" in out and "FAILED" in out
    # --allow-missing accepts the missing image but not the corrupt ones
    assert main(["verify", "oxford5k", "--root", str(tmp_path), "--allow-missing", "--no-progress"]) == 1

    clean = tmp_path / "clean" / "oxford5k"
    write_benchmark(clean, corrupt=False)
    assert main(["verify", "oxford5k", "--root", str(clean), "--no-progress"]) == 1
    assert main(["verify", "oxford5k", "--root", str(clean), "--allow-missing", "--no-progress"]) == 0
    assert "OK (subset)" in capsys.readouterr().out
    (clean / "jpg" / "all_souls_000003.jpg").write_bytes((clean / "jpg" / "all_souls_000002.jpg").read_bytes())
    assert main(["verify", "oxford5k", "--root", str(clean), "--no-progress", "--workers", "1"]) == 0
    assert "OK: every listed image is present and decodable" in capsys.readouterr().out


def test_verify_without_ground_truth_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "paris6k").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main(["verify", "rparis6k", "--root", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: rparis6k: no ground truth in") and "gnd_rparis6k.pkl" in err
    assert len(err.splitlines()) == 1


def test_synthetic_passes_only_the_options_given(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys, caplog: pytest.LogCaptureFixture
) -> None:
    import oxford_ir.benchmarks.synthetic as synthetic

    calls = []

    def record(root, **kwargs):
        calls.append((root, kwargs))
        return Path(root)

    monkeypatch.setattr(synthetic, "write_synthetic_benchmark", record)
    assert main(["synthetic", "--root", str(tmp_path / "s"), "--seed", "4", "--photo-long-side", "64"]) == 0
    assert calls == [(tmp_path / "s", {"seed": 4, "photo_long_side": 64})]
    assert main(["synthetic", "--root", str(tmp_path / "s"), "--image-size", "64"]) == 0  # the deprecated name
    assert calls[-1] == (tmp_path / "s", {"photo_long_side": 64})
    assert "--image-size is deprecated" in caplog.text and "use --photo-long-side" in caplog.text
    with pytest.raises(SystemExit) as both:
        main(["synthetic", "--root", str(tmp_path / "s"), "--image-size", "64", "--photo-long-side", "64"])
    assert both.value.code == 2 and "give --photo-long-side only" in capsys.readouterr().err
    assert main(["synthetic", "--root", str(tmp_path / "t"), "--landmarks", "2", "--images-per-landmark", "3"]) == 0
    assert calls[-1] == (tmp_path / "t", {"n_landmarks": 2, "images_per_landmark": 3})
    assert main(["synthetic", "--root", str(tmp_path / "u"), "--preset", "tiny", "--distractors", "0"]) == 0
    assert calls[-1] == (tmp_path / "u", {**synthetic.SYNTHETIC_TINY, "n_distractors": 0})
    assert main(["synthetic", "--root", str(tmp_path / "w"), "--workers", "3"]) == 0
    assert calls[-1] == (tmp_path / "w", {"workers": 3})
    monkeypatch.setenv("OXFORD_IR_DATA", str(tmp_path / "env"))
    assert main(["synthetic"]) == 0
    assert calls[-1] == (tmp_path / "env" / "synthetic", {})
    assert "synthetic benchmark written to" in capsys.readouterr().out


def test_synthetic_then_verify_for_real(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "synthetic"
    assert main(["-q", "synthetic", "--root", str(folder), "--preset", "tiny", "--seed", "1"]) == 0
    for name in ("synthetic", "rsynthetic"):
        assert main(["verify", name, "--root", str(tmp_path), "--no-progress"]) == 0
    assert capsys.readouterr().out.count("OK: every listed image is present and decodable") == 2


def test_bad_arguments_are_one_error_line(capsys: pytest.CaptureFixture) -> None:
    """argparse's refusals in the project's format: one ``error:`` line naming the option, no usage block."""
    with pytest.raises(SystemExit) as exit_info:
        main(["download", "holidays"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: oxford-ir-data download: argument dataset: invalid choice: 'holidays'")
    assert len(err.splitlines()) == 1 and "oxford-ir-data download --help" in err
    for value, shown in (("0", "got 0"), ("abc", "got 'abc'")):
        with pytest.raises(SystemExit):
            main(["synthetic", "--landmarks", value])
        err = capsys.readouterr().err
        assert err.splitlines() == [
            f"error: oxford-ir-data synthetic: argument --landmarks: expected a whole number >= 1, {shown} "
            "(see oxford-ir-data synthetic --help)"
        ]


def test_help_in_a_subprocess() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "oxford_ir.cli.data", "--help"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    for command in ("download", "verify", "synthetic"):
        assert command in result.stdout
    result = subprocess.run(
        [sys.executable, "-m", "oxford_ir.cli.data", "download", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and "--sources" in result.stdout and "--base-url" in result.stdout
