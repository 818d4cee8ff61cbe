"""A batch-scaling study killed with SIGKILL (its whole process group, as a terminal or a scheduler does) at several
moments and re-run each time finishes with every trial trained once: no finished trial is trained again, and
`optuna.db` agrees with the tables. A damaged table is then rebuilt without training.

The trainings are counted from the trial records (`gradalign.ray_adapter.records`): every evaluation interval
computed and saved adds `[evaluation, pid]` to its record, so a trial trained twice would show an evaluation twice or
a record too many. Tune is
told to snapshot its experiment state only every 10 minutes, so after each kill it remembers (almost) nothing of
what ran since it started: the worst case for resuming, which the records must make up for.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
CELLS, TRIALS, SEEDS, EVALUATIONS = ("sgd-B16", "gradalign-B32"), 2, 2, 2
STUDY = [
    "studies/batch_scaling.py",
    "--dataset",
    "digits",
    "--model",
    "mlp",
    "--batch-sizes",
    "32",
    "--algorithms",
    "sgd",
    "gradalign",
    "--micro-batch",
    "16",
    "--epochs",
    "2",
    "--eval-points",
    str(EVALUATIONS),
    "--trials-per-cell",
    str(TRIALS),
    "--seeds",
    str(SEEDS),
    "--target",
    "0.5",
    "--no-asha",  # (every trial runs its whole budget: 'finished' below is the trainer's own status)
    "--confirm-top",
    "1",
    "--confirm-seeds",
    "1",
    "--name",
    "killed",
]


def records(out: Path, phase: str) -> dict[str, dict]:
    """The trial records of a phase, by configuration key."""
    found = {}
    for path in (out / "trials" / phase / "history").glob("*.json"):
        found[path.stem] = json.loads(path.read_text())
    return found


def finished(record: dict) -> bool:
    return bool(record["history"]) and record["history"][-1]["status"] in ("completed", "diverged")


class KilledStudy:
    """Runs the study as a subprocess in its own session, with its own Ray temp dir, and kills it at given moments."""

    def __init__(self, folder: Path):
        self.out = folder / "study"
        self.logs = folder
        self.ray_tmp = tempfile.mkdtemp(prefix="rk", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
        self.env = {
            **os.environ,
            "RAY_TMPDIR": self.ray_tmp,
            "TUNE_GLOBAL_CHECKPOINT_S": "600",
            "OMP_NUM_THREADS": "1",
            "RAY_DEDUP_LOGS": "0",
        }
        self.runs = 0
        self.kills: list[str] = []
        self.finished_at_kills: dict[tuple[str, str], list] = {}  # (phase, key) -> trainings of a finished record

    def start(self) -> subprocess.Popen:
        self.runs += 1
        log = open(self.logs / f"run{self.runs}.log", "w")
        return subprocess.Popen(
            [sys.executable, *STUDY, "--out", str(self.out)],
            cwd=REPO,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def log(self) -> str:
        return (self.logs / f"run{self.runs}.log").read_text()[-4000:]

    def kill_when(self, moment: str, ready, timeout: float = 240) -> bool:
        """Start a run, SIGKILL its process group as soon as `ready()` holds, and reap what survives of its Ray.
        Returns False (nothing killed) if the run ended first."""
        proc = self.start()
        deadline = time.monotonic() + timeout
        while not ready():
            if proc.poll() is not None:
                assert proc.returncode == 0, self.log()
                return False
            assert time.monotonic() < deadline, f"{moment}: not reached in {timeout} s\n{self.log()}"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        self.reap(proc.pid)
        self.kills.append(moment)
        for phase in ("tune", "confirm", "seed"):
            for key, record in records(self.out, phase).items():
                if finished(record):
                    self.finished_at_kills.setdefault((phase, key), record["trained"])
        return True

    def finish(self) -> str:
        proc = self.start()
        try:
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            self.reap(proc.pid)
        assert proc.returncode == 0, self.log()
        return self.log()

    def reap(self, session: int) -> None:
        """Kill what is left of the killed run: its Ray processes (raylet, GCS, workers) may outlive the driver.
        Only this run's: the processes of its session, or those using its Ray temp dir."""
        deadline = time.monotonic() + 30
        while (left := self._processes(session)) and time.monotonic() < deadline:
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        assert not self._processes(session), "processes of the killed study survived"

    def _processes(self, session: int) -> list[int]:
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if fields[0] == "Z":
                continue
            if int(fields[3]) == session or self.ray_tmp in cmdline:  # fields[3]: the session id
                pids.append(int(entry.name))
        return pids

    def cleanup(self) -> None:
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


def tables_saved(out: Path, phase: str) -> int:
    return sum((out / "cells" / cell / f"{phase}.parquet").exists() for cell in CELLS)


@pytest.fixture
def own_dir():
    """A folder of this test's own: pytest's numbered temp folders are shared with other pytest processes of the same
    user, which delete the older ones -- possibly while this long test still runs."""
    path = Path(tempfile.mkdtemp(prefix="kill-resume-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_study_killed_at_any_moment_trains_every_trial_once(own_dir):
    study = KilledStudy(own_dir)
    out = study.out
    try:
        # 1. during tuning: as soon as a tuning trial has finished (Tune has not recorded it yet)
        assert study.kill_when("tuning", lambda: any(finished(r) for r in records(out, "tune").values()))
        # 2. between the phases: once both cells' tuning tables are saved
        study.kill_when("between phases", lambda: tables_saved(out, "tune") == len(CELLS))
        # 3. during the seed runs: as soon as one has finished
        study.kill_when("seeds", lambda: any(finished(r) for r in records(out, "seed").values()))
        # 4. right after the last trial finished, before the tables and the report are written
        study.kill_when(
            "after the trials", lambda: sum(finished(r) for r in records(out, "seed").values()) == len(CELLS) * SEEDS
        )
        study.finish()
        trainings = {p: {k: r["trained"] for k, r in records(out, p).items()} for p in ("tune", "confirm", "seed")}
        ran = json.loads((out / "summary.json").read_text())

        # the report rebuilt from the folder alone states the same verdict, budget and ranges as the run
        (out / "summary.json").unlink()
        (out / "report.html").unlink()
        rebuilt = subprocess.run(
            [sys.executable, STUDY[0], "--report-only", "--out", str(out)],
            cwd=REPO,
            env=study.env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert rebuilt.returncode == 0, rebuilt.stderr[-3000:]
        again = json.loads((out / "summary.json").read_text())
        for key in ("verdict", "budget", "protocol", "comparisons"):
            assert again[key] == ran[key], key
        assert "searched for gradalign" in again["budget"] and again["protocol"]["budget"]["amount"] == 2 * 1296
        assert all(sentence in rebuilt.stdout for sentence in ran["verdict"])

        # a damaged table is rebuilt from the records, without training
        damaged = out / "cells" / CELLS[0] / "seed.parquet"
        damaged.write_bytes(damaged.read_bytes()[:100])
        log = study.finish()
        assert "is damaged" in log and "rebuilding it from the trial records" in log
        assert {
            p: {k: r["trained"] for k, r in records(out, p).items()} for p in ("tune", "confirm", "seed")
        } == trainings
    finally:
        study.cleanup()

    print(f"\nkills: {study.kills}; runs: {study.runs}")
    assert len(study.kills) >= 3, study.kills
    history = pd.read_parquet(out / "history.parquet")
    for phase, trials in (("tune", TRIALS), ("confirm", 1), ("seed", SEEDS)):
        recs = records(out, phase)
        trainings = sum(len(r["trained"]) for r in recs.values())
        print(
            f"{phase}: {len(recs)} trial configurations, {trainings} evaluation intervals trained "
            f"(uninterrupted: {len(CELLS) * trials * EVALUATIONS})"
        )
        # as many configurations as the budget: none was dropped and re-run as another
        assert len(recs) == len(CELLS) * trials
        for key, record in recs.items():
            done = [evaluation for evaluation, _ in record["trained"]]
            assert len(done) == len(set(done)), f"{phase} trial {key} trained an interval twice: {record['trained']}"
            assert finished(record)
            if (phase, key) in study.finished_at_kills:  # finished before a kill: never trained again
                assert record["trained"] == study.finished_at_kills[(phase, key)], key
        rows = history[history["phase"] == phase]
        assert not rows.duplicated(["trial_id", "evaluation"]).any()
        assert set(rows["trial_id"]) == {r["trial_ids"][0] for r in recs.values()}
        for trial_id, part in rows.groupby("trial_id"):
            assert sorted(part["evaluation"]) == list(range(1, EVALUATIONS + 1)), trial_id

    # optuna.db: one COMPLETE trial per tuning trial of the tables, with its final value, nothing else
    tuned = history[history["phase"] == "tune"].sort_values("evaluation").groupby("trial_id").tail(1)
    for cell in CELLS:
        study_db = optuna.load_study(study_name=cell, storage=f"sqlite:///{out / 'optuna.db'}")
        got = {t.user_attrs["tune_trial_id"]: t for t in study_db.trials}
        want = tuned[tuned["cell"] == cell].set_index("trial_id")
        assert set(got) == set(want.index) and len(study_db.trials) == TRIALS
        for trial_id, trial in got.items():
            assert trial.state == optuna.trial.TrialState.COMPLETE
            assert trial.value == pytest.approx(want.loc[trial_id, "val_accuracy"])
