"""SIGTERM during a run: no half-written temporary file, no empty output folder the run created."""
import os
import signal
import subprocess
import sys
import textwrap

# A child that runs `attnstats validate --csv PATH` with one made-up claim and a CSV writer that writes
# half a file, says so on stdout and then waits: the parent sends SIGTERM at exactly that moment.
CHILD = textwrap.dedent("""
    import sys, time
    import pandas as pd
    import attnstats.app.claims as claims
    from attnstats.app.cli import main

    claims.run_claims = lambda quick, seed: [claims.ClaimResult("§2", "c", 1.0, 1.0, "rel 0.1", True, True, "r")]

    def half_then_wait(self, path, **kwargs):
        open(path, "w").write("section,claim\\n§2,")
        print("WRITING", flush=True)
        time.sleep(60)

    pd.DataFrame.to_csv = half_then_wait
    sys.exit(main(["validate", "--csv", sys.argv[1]]))
""")


def terminate_while_writing(csv):
    env = {**os.environ, "ATTNSTATS_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(csv)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             stdin=subprocess.DEVNULL, text=True, env=env)
    try:
        for line in child.stdout:
            if line.strip() == "WRITING":
                break
        else:
            raise AssertionError("the child ended before writing: " + child.stderr.read())
        child.send_signal(signal.SIGTERM)
        child.wait(timeout=30)
        return child.returncode, child.stderr.read()
    finally:
        child.kill()
        child.wait()


def test_sigterm_removes_the_temporary_file_and_the_new_folder(tmp_path):
    code, err = terminate_while_writing(tmp_path / "new" / "sub" / "claims.csv")
    assert code == 128 + signal.SIGTERM, err
    assert "attnstats validate: terminated" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # no .claims.csv.XXXX left, and the folders the run made are gone


def test_sigterm_keeps_the_old_file_and_its_folder(tmp_path):
    old = tmp_path / "claims.csv"
    old.write_text("old")
    code, err = terminate_while_writing(old)
    assert code == 128 + signal.SIGTERM, err
    assert [p.name for p in tmp_path.iterdir()] == ["claims.csv"] and old.read_text() == "old"
