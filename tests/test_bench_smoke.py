"""`scripts/bench.py` runs every variant end to end at tiny sizes, and each verifies its result."""

import importlib.util
import json
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

from bank.ledger import postings

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench.py"


def load_script(path: Path, name: str) -> ModuleType:
    """A script loaded as a module named `name` (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and the ORM look their module up here
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_script(SCRIPT, "bank_bench_script")


def test_every_variant_runs_and_verifies(
    bench: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Short runs of postings, so that the engine and the ceiling (d) both write some.
    monkeypatch.setattr(postings, "POSTINGS_RUN_ROWS", 300)
    out = tmp_path / "bench.json"
    code = bench.main(
        [
            "--only",
            "a,n,b,c,s,d,e,f,m",
            "--ops",
            "a=40,n=20,b=200,c=1000,s=1000,d=2000,e=500,f=500,m=500",
            "--accounts",
            "10",
            "--rounds",
            "2",
            "--dir",
            str(tmp_path / "ledgers"),
            "--json",
            str(out),
        ]
    )
    assert code == 0
    doc = json.loads(out.read_text())
    assert list(doc["variants"]) == ["a", "n", "b", "c", "s", "d", "e", "f", "m"]
    for name, variant in doc["variants"].items():
        assert variant["verified"], (name, variant["problems"])
        if name in ("f", "m"):  # the simulation's mixed workload refuses some operations
            assert variant["accepted"] + variant["rejected"] == variant["ops"] == 500
            assert variant["rejected"] > 0
            continue
        assert variant["accepted"] == variant["ops"] and variant["rejected"] == 0
        assert variant["ops_s"] > 0
    assert doc["variants"]["a"]["ratio_to_a"] == 1.0
    assert doc["variants"]["n"]["ratio_to_n"] == 1.0
    assert doc["variants"]["d"]["ratio_to_d"] == 1.0
    assert doc["variants"]["c"]["target_met"] in (True, False)
    # The ceiling writes the ledger the engine writes: its postings up to the watermark.
    (upto,) = [c.removeprefix("postings up to ") for c in doc["variants"]["d"]["checks"]
               if c.startswith("postings up to ")]  # fmt: skip
    assert int(upto) >= 2000, upto  # 2,000 rows in 1,000-row commits, a run every 300
    # (m) is (s)'s in-flight count: 16 tellers x a window of 64; (f) simulate's defaults.
    assert (doc["variants"]["m"]["tellers"], doc["variants"]["m"]["window"]) == (16, 64)
    assert doc["variants"]["f"]["tellers"] * doc["variants"]["f"]["window"] < 16 * 64
    assert doc["environment"]["gc"] == "default"  # the collector as an application has it
    for variant, reference in (("s", "d"), ("c", "d"), ("b", "n"), ("m", "s"), ("f", "n")):
        assert reference in doc["variants"][variant]["round_ratios"], variant
    # Two rounds of every variant; the reported figure is the median (here the slower) round.
    assert doc["rounds"] == 2
    for variant in doc["variants"].values():
        speeds = [r["ops_s"] for r in variant["rounds"]]
        assert len(speeds) == 2 and variant["ops_s"] == min(speeds)
    c_rounds = doc["variants"]["c"]["rounds"]
    d_rounds = doc["variants"]["d"]["rounds"]
    expected = [c["ops_s"] / d["ops_s"] for c, d in zip(c_rounds, d_rounds, strict=True)]
    assert doc["variants"]["c"]["round_ratios"]["d"] == pytest.approx(expected, rel=1e-3)


def test_the_open_variant_reports_p99_at_80_percent_of_a_measured_maximum(
    bench: ModuleType, tmp_path: Path
) -> None:
    out = tmp_path / "bench.json"
    argv = ["--only", "o", "--ops", "o=400", "--accounts", "10", "--rounds", "2"]
    assert bench.main([*argv, "--dir", str(tmp_path / "ledgers"), "--json", str(out)]) == 0
    o = json.loads(out.read_text())["variants"]["o"]
    assert o["verified"], o["problems"]
    assert o["accepted"] + o["rejected"] == o["ops"] == 400
    # The rate is 80% of what the flood just before got through, and p99 is a real figure.
    assert o["rate_ops_s"] == pytest.approx(0.8 * o["max_rate_ops_s"], rel=1e-3)
    assert o["max_rate_ops_s"] > 0
    assert 0 < o["p50_ms"] <= o["p99_ms"]
    assert o["target"] == "p99_ms <= 10" and o["target_met"] is (o["p99_ms"] <= 10)
    assert len(o["rounds"]) == 2


def test_the_long_mode_measures_rss_and_a_full_ledger(bench: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    argv = ["--only", "d", "--ops", "d=200", "--rounds", "1", "--accounts", "10"]
    assert bench.main([*argv, "--long", "--long-ops", "3000", "--json", str(out)]) == 0
    long = json.loads(out.read_text())["long"]
    assert long["verified"], long["problems"]
    assert long["ops"] == 3000 and long["probe_ops"] == 3000
    assert long["rows_before_probe_at_end"] >= 6000 + 10  # the probe ran on the long run's rows
    assert long["empty_ops_s"] > 0 and long["full_ops_s"] > 0
    assert long["rss_target_met"] in (True, False) and long["ratio_target_met"] in (True, False)


def test_other_wait_and_insert_modes(bench: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    argv = [
        "--only",
        "c,d",
        "--ops-scale",
        "0.005",
        "--accounts",
        "5",
        "--wait",
        "wait",
        "--gc",
        "throughput",
        "--rounds",
        "1",
    ]
    code = bench.main(
        [*argv, "--raw-insert", "values", "--durability", "normal", "--json", str(out)]
    )
    assert code == 0
    doc = json.loads(out.read_text())
    assert doc["variants"]["c"]["wait"] == "wait"
    assert doc["variants"]["d"]["insert"] == "values"
    assert doc["environment"]["durability"] == "normal"
    assert doc["environment"]["gc"] == "throughput"
    assert all(v["verified"] for v in doc["variants"].values())


def test_help_and_bad_arguments(bench: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        bench.main(["--help"])
    assert exc.value.code == 0
    assert "--durability" in capsys.readouterr().out
    for bad in (
        ["--only", "x"],
        ["--ops", "z=5"],
        ["--ops", "a=0"],
        ["--accounts", "1"],
        ["--rounds", "0"],
    ):
        with pytest.raises(SystemExit) as exc:
            bench.main(bad)
        assert exc.value.code == 2


def test_pipeline_cost_times_every_stage_and_writes_a_sound_ledger(tmp_path: Path) -> None:
    module = load_script(SCRIPT.parent / "pipeline_cost.py", "bank_pipeline_cost_script")
    out = tmp_path / "cost.json"
    # 1,000 transfers in commits of 96: the last commit is a partial one.
    assert (
        module.main(["--ops", "1000", "--batch", "96", "--accounts", "20", "--json", str(out)]) == 0
    )
    figures = json.loads(out.read_text())
    assert figures["audit_ok"] is True
    stages = figures["stages_us_per_op"]
    assert set(stages) == {"futures", "worker", "write", "commit", "answer", "result"}
    assert all(value > 0 for value in stages.values())
    for bad in (["--accounts", "1"], ["--ops", "0"], ["--batch", "0"]):
        with pytest.raises(SystemExit) as exc:
            module.main(bad)
        assert exc.value.code == 2


def postgres_url() -> str:
    """The server for the PostgreSQL variants: `BANK_TEST_POSTGRES_URL`, else "" (the bench
    then starts a throwaway cluster itself, which this also tests); skips, with the reason,
    when neither is possible (a failure under `BANK_REQUIRE_POSTGRES=1`, as in CI)."""
    url = os.environ.get("BANK_TEST_POSTGRES_URL", "")
    if url:
        return url
    import shutil

    have_server = shutil.which("initdb") or list(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if importlib.util.find_spec("psycopg") is None or not have_server:
        reason = "no BANK_TEST_POSTGRES_URL, and no psycopg or PostgreSQL binaries to start one"
        if os.environ.get("BANK_REQUIRE_POSTGRES", "") not in ("", "0"):
            pytest.fail(reason)
        pytest.skip(reason)
    return ""


def test_postgres_variants_run_and_verify(
    bench: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Runs of postings shorter than the runs, so that (g), (p) and every ceiling write some
    # (`check_ceiling` fails a candidate whose watermark stayed behind).
    monkeypatch.setattr(postings, "POSTINGS_RUN_ROWS", 100)
    url = postgres_url()
    out = tmp_path / "bench.json"
    code = bench.main(
        [
            "--only",
            "g,p,h,i",
            "--ops",
            "g=300,p=300,h=400",
            "--pg-raw",
            "unnest,unnest-text,values,copy,pipeline",
            "--pg-raw-batch",
            "64,150",
            "--pgbench-seconds",
            "1",
            "--pgbench-scale",
            "1",
            "--accounts",
            "10",
            "--rounds",
            "2",
            "--pg-url",
            url,
            "--json",
            str(out),
        ]
    )
    assert code == 0
    doc = json.loads(out.read_text())
    pg = doc["environment"]["postgresql"]
    assert pg["version"] and pg["fsync"] in ("on", "off")
    raw = doc["variants"]["h"]
    assert raw["verified"] and raw["accepted"] == raw["ops"] == 400
    for each in raw["rounds"]:  # every candidate measured; the fastest is the ceiling
        candidates = each["candidates_rows_s"]
        assert set(candidates) == {
            f"{m}@{n}" for m in bench.bench_pg.RAW_METHODS for n in (64, 150)
        }
        assert all(v > 0 for v in candidates.values())
        assert each["ops_s"] == pytest.approx(max(candidates.values()), rel=1e-3)
    assert raw["method"] in raw["candidates_rows_s"]
    tpcb = doc["variants"]["i"]
    assert tpcb["verified"] and tpcb["ops_s"] > 0 and tpcb["rejected"] == 0
    assert "pgbench -c 8 -j 2 -T 1" in tpcb["command"]
    for variant in ("g", "p"):  # the engine on PostgreSQL: submit_many, submit_batch
        engine = doc["variants"][variant]
        assert engine["verified"], engine["problems"]
        assert engine["accepted"] == engine["ops"] == 300
        assert engine["ratio_to_h"] > 0 and engine["ratio_to_i"] > 0
        assert engine["target_met"] in (True, False)
    if url:  # the run dropped every database it made on the given server
        import bench_pg
        import psycopg

        with psycopg.connect(bench_pg.conninfo(url)) as conn:
            left = conn.execute(
                "SELECT datname FROM pg_database WHERE datname ~ %s",
                (f"^bench_[a-z]+_{os.getpid()}$",),
            ).fetchall()
        assert left == []


def test_postgres_variants_skip_without_a_server(bench: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    argv = ["--only", "d,h,i", "--ops", "d=500,h=500", "--rounds", "1", "--json", str(out)]
    # Port 1 refuses at once: the PostgreSQL variants are skipped, SQLite's still run.
    assert bench.main([*argv, "--pg-url", "postgresql+psycopg://postgres@127.0.0.1:1/x"]) == 0
    doc = json.loads(out.read_text())
    assert list(doc["variants"]) == ["d"]
    assert set(doc["skipped"]) == {"h", "i"}
    assert all(
        why.startswith("no PostgreSQL server (cannot reach") for why in doc["skipped"].values()
    )


def test_open_tail_reports_each_threads_cost_and_a_sound_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bank.simulate import runner

    # The script sets these process-wide; put them back afterwards.
    monkeypatch.setattr(runner, "SEND_TICK_NS", runner.SEND_TICK_NS)
    monkeypatch.setattr(postings, "POSTINGS_RUN_ROWS", postings.POSTINGS_RUN_ROWS)
    module = load_script(SCRIPT.parent / "open_tail.py", "bank_open_tail_script")
    out = tmp_path / "tail.json"
    argv = ["--rates", "2000", "--ops", "600", "--tellers", "2", "--window", "4"]
    argv += ["--tick-ms", "2", "--postings-run-rows", "100", "--json", str(out)]
    assert module.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["knobs"] == "tick 2 ms, postings run 100 rows"
    assert runner.SEND_TICK_NS == 2_000_000
    assert getattr(postings, "POSTINGS_RUN_ROWS") == 100  # noqa: B009 (a Final, set by the script)
    (run,) = report["runs"]
    assert run["audit_ok"] is True
    assert (run["tellers"], run["window"], run["rate_ops_s"]) == (2, 4, 2000.0)
    assert 0 < run["throughput_ops_s"] <= 2000 * 1.05  # an open run does not outrun its rate
    assert run["ops_per_commit"] >= 1 and run["p99_ms"] >= run["p50_ms"] > 0
    threads = run["thread_cpu_us_per_op"]
    assert {"teller", "bank-worker", "bank-ledger-writer"} <= set(threads)
    assert all(us >= 0 for us in threads.values())
    assert "cpu-sampler" not in threads and "MainThread" not in threads
    for bad in (
        ["--rates", "0"],
        ["--rates", ","],
        ["--rates", "8k"],
        ["--ops", "0"],
        ["--tick-ms", "-1"],
        ["--tellers", "0"],
        ["--window", "0"],
    ):
        with pytest.raises(SystemExit) as exc:
            module.main(["--tick-ms", "3", *bad])  # a bad --tick-ms comes last and wins
        assert exc.value.code == 2
        assert runner.SEND_TICK_NS == 2_000_000  # a refused command line changes nothing
