"""Scripts that replace an output folder never remove what they did not create."""
import os
import subprocess

from conftest import REPO


def test_fdda_smoke_refuses_a_folder_it_did_not_make(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    env = dict(os.environ, SMOKE="1", SMOKE_DIR=str(mine), PYTHON="false")   # refused before any python runs
    r = subprocess.run(["bash", os.path.join(REPO, "fdda", "reproduce.sh")], capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "is not an earlier smoke output" in r.stderr
    assert (mine / "thesis.tex").read_text() == "years of work" and os.listdir(mine) == ["thesis.tex"]
    afile = tmp_path / "a-file"
    afile.write_text("x")
    r = subprocess.run(["bash", os.path.join(REPO, "fdda", "reproduce.sh")], capture_output=True, text=True,
                       env=dict(env, SMOKE_DIR=str(afile)), timeout=60)
    assert r.returncode == 2 and afile.read_text() == "x"
