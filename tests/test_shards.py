"""Sharding as a sweep axis: a sample's shard is a function of its id (sha1 mod n), ``dataset.shards=N``
expands to the N shard jobs, and the merge of a run's shards checks completeness and gives exactly
the unsharded job's tables."""
from __future__ import annotations

import hashlib
import json
import shutil

import pandas as pd
import pytest

from harness.aggregate import load_run
from harness.cli import UsageError, check_jobs, main
from harness.data import open_dataset
from harness.data.generic import SHARD_FOLDER_RE, shard_index
from harness.merge import ShardError, expand_shards, sharded_jobs
from harness.runner import Job, JobConfig

from .conftest import job_config


def _sha1_mod(sid: str, n: int) -> int:
    # independent of the harness: the id's sha1 digest read as a big-endian integer, mod n
    return int(hashlib.sha1(sid.encode("utf-8")).hexdigest(), 16) % n


def test_shard_of_an_id_is_sha1_mod_n_and_shards_partition():
    ids = [f"sample-{i}" for i in range(200)] + ["ü-ñ", "a/b", ""]
    for n in (1, 2, 3, 7):
        assert [shard_index(s, n) for s in ids] == [_sha1_mod(s, n) for s in ids]
    # balanced enough to be useful: every one of 7 shards gets some of 200 ids
    assert {shard_index(s, 7) for s in ids} == set(range(7))


def test_dataset_shards_depend_on_ids_not_order(builder, tmp_path):
    for i in range(12):
        builder.add_simple(f"s{i}")
    ds = lambda **kw: open_dataset({**builder.config(), **kw})  # noqa: E731
    every = [r.id for r in ds().refs()]
    shards = [[r.id for r in ds(shard=f"{i}/3").refs()] for i in range(3)]
    assert sorted(sum(shards, [])) == sorted(every)  # a partition
    for i, got in enumerate(shards):
        assert got == [s for s in every if _sha1_mod(s, 3) == i]  # in the dataset's order
    # the same samples listed in reverse order: each stays in its shard
    builder.records.reverse()
    builder.write()
    for i, got in enumerate(shards):
        assert sorted(r.id for r in ds(shard=f"{i}/3").refs()) == sorted(got)
    # limit first, then shard: the shards of a limited job partition the limited job's samples
    first = [r.id for r in ds(limit=5).refs()]
    assert sorted(sum(([r.id for r in ds(limit=5, shard=f"{i}/2").refs()] for i in range(2)), [])) == sorted(first)


def test_multi_turn_sessions_are_sharded_whole():
    from harness.data.generic import SampleRef, select_refs

    sessions = [[SampleRef(f"{s}_{t}", {"session": s}, "") for t in range(1, 4)] for s in ("101", "202", "303", "404")]
    for n in (2, 3):
        got = [select_refs(sessions, "mb", None, (i, n), None) for i in range(n)]
        for i, units in enumerate(got):
            assert [u[0].record["session"] for u in units] == [s[0].record["session"] for s in sessions
                                                               if _sha1_mod(s[0].record["session"], n) == i]


def test_expand_shards():
    assert expand_shards(["method=a", "dataset.shards=3"]) == ["method=a", "dataset.shard=0/3,1/3,2/3"]
    assert expand_shards(["++dataset.shards=1"]) == ["dataset.shard=0/1"]
    assert expand_shards(["method=a"]) == ["method=a"]
    for bad in (["dataset.shards=0"], ["dataset.shards=x"], ["dataset.shards=2,3"]):
        with pytest.raises(ValueError, match="whole number >= 1"):
            expand_shards(bad)
    with pytest.raises(ValueError, match="both choose shards"):
        expand_shards(["dataset.shards=2", "dataset.shard=0/2"])


def test_cli_expands_shards_into_jobs(capsys):
    jobs = check_jobs(expand_shards(["method=identity,inpaint", "dataset.shards=3", "metrics=pixel"]), multirun=True)
    assert len(jobs.points) == 6 and "dataset.shard" in jobs.swept
    assert sorted({o for p in jobs.points for o in p if o.startswith("dataset.shard=")}) == [
        "dataset.shard=0/3", "dataset.shard=1/3", "dataset.shard=2/3"]
    assert main(["run", "dataset.shards=2"]) == 2
    assert "add -m" in capsys.readouterr().err
    assert main(["run", "-m", "dataset.shards=0"]) == 2
    assert "whole number >= 1" in capsys.readouterr().err


def _run(dataset_cfg, results, **kw):
    cfg = job_config(dataset_cfg, results, **kw)
    return Job(JobConfig.from_mapping(cfg)).run(cfg)


@pytest.mark.parametrize("method", [{"name": "identity"}, {"name": "inpaint"}])
def test_merged_shards_equal_the_unsharded_job(builder, tmp_path, method):
    for i in range(9):
        builder.add_simple(f"s{i}", seed=i, category=("remove", "add")[i % 2])
    ds = {**builder.config(), "shard": None}  # as in every dataset YAML
    one = _run(ds, tmp_path / "one", method=method)
    for i in range(3):  # separate cache: every edit computed again, shard by shard
        _run({**ds, "shard": f"{i}/3"}, tmp_path / "three", method=method)
    jobs = sorted(p.name for p in (tmp_path / "three" / "test" / "jobs").iterdir())
    assert [SHARD_FOLDER_RE.fullmatch(j)["job"] for j in jobs] == [one.job_dir.name] * 3
    s1, e1 = load_run(tmp_path / "one" / "test")
    s3, e3 = load_run(tmp_path / "three" / "test")
    pd.testing.assert_frame_equal(s3, s1, check_exact=True)
    # timings and memory are measurements of each computation, not functions of the inputs
    measured = ["prep_seconds", "infer_seconds", "peak_memory_bytes"]
    pd.testing.assert_frame_equal(e3.drop(columns=measured), e1.drop(columns=measured), check_exact=True)

    # sharing the unsharded job's cache: nothing is computed again, and the tables are identical
    cache = tmp_path / "one" / "test" / "edits"
    for i in range(3):
        out = _run({**ds, "shard": f"{i}/3"}, tmp_path / "shared", method=method, cache_dir=str(cache))
        assert out.computed == 0
    s, e = load_run(tmp_path / "shared" / "test")
    pd.testing.assert_frame_equal(s, s1, check_exact=True)
    pd.testing.assert_frame_equal(e, e1, check_exact=True)


def _sharded_identity_run(builder, tmp_path, samples: int, shards: int):
    """``samples`` synthetic samples edited by identity in ``shards`` shard jobs: (dataset config,
    run folder, the one sharded job)."""
    for i in range(samples):
        builder.add_simple(f"s{i}")
    ds = {**builder.config(), "shard": None}  # as in every dataset YAML
    for i in range(shards):
        _run({**ds, "shard": f"{i}/{shards}"}, tmp_path)
    run = tmp_path / "test"
    (g,) = sharded_jobs(run)
    return ds, run, g


def test_merge_names_missing_unfinished_and_doubled_shards(builder, tmp_path, capsys):
    ds, run, g = _sharded_identity_run(builder, tmp_path, 6, 3)
    assert g.count == 3 and sorted(g.folders) == [0, 1, 2]
    assert len(load_run(run)[1]) == 6

    # a shard whose task died before its manifest, and one never run
    manifest = g.folders[1] / "manifest.json"
    saved = manifest.read_bytes()
    manifest.unlink()
    shutil.rmtree(g.folders[2])
    with pytest.raises(ShardError) as e:
        load_run(run)
    msg = str(e.value)
    assert "shard(s) 2/3 missing" in msg and "shard(s) 1/3 not finished" in msg
    assert "method identity, dataset synthetic" in msg and "re-submit the same command" in msg
    assert main(["report", str(run)]) == 1  # the report command stops on it too, with the message
    assert "shard(s) 2/3 missing" in capsys.readouterr().err
    manifest.write_bytes(saved)
    _run({**ds, "shard": "2/3"}, tmp_path)
    assert len(load_run(run)[1]) == 6

    # the same job sharded twice, or sharded and unsharded: its samples would count twice
    _run({**ds, "shard": "0/2"}, tmp_path)
    _run({**ds, "shard": "1/2"}, tmp_path)
    with pytest.raises(ShardError, match="shards of 2 and of 3"):
        load_run(run)
    for f in (run / "jobs").glob("*~shard*of2"):
        shutil.rmtree(f)
    _run(ds, tmp_path)
    with pytest.raises(ShardError, match="both an unsharded folder"):
        load_run(run)


def test_a_sample_in_two_shards_is_refused(builder, tmp_path):
    _ds, run, g = _sharded_identity_run(builder, tmp_path, 4, 2)
    # shard 1's table altered as if made from another dataset: it repeats a sample of shard 0
    e0 = pd.read_parquet(g.folders[0] / "edits.parquet")
    e1 = pd.read_parquet(g.folders[1] / "edits.parquet")
    pd.concat([e1, e0.iloc[:1]]).to_parquet(g.folders[1] / "edits.parquet", index=False)
    with pytest.raises(ShardError, match=f"sample\\(s\\) {e0.iloc[0]['sample_id']} are in more than one shard"):
        load_run(run)


def test_sharded_sweep_through_the_cli_and_its_report(builder, tmp_path):
    for i in range(5):
        builder.add_simple(f"s{i}")
    # one cache for both runs: the sharded sweep computes nothing again, so even the timing
    # columns of the report (measurements) are the same
    common = ["metrics=pixel", "progress=false", f"dataset.root={builder.root}", "dataset.name=syn",
              f"results_dir={tmp_path}", f"cache_dir={tmp_path / 'cache'}"]
    assert main(["run", "-m", "method=identity,inpaint", "run_name=plain", *common]) == 0
    assert main(["run", "-m", "method=identity,inpaint", "dataset.shards=2", "run_name=sh", *common]) == 0
    jobs = sorted(p.name for p in (tmp_path / "sh" / "jobs").iterdir())
    assert len(jobs) == 4 and all(SHARD_FOLDER_RE.fullmatch(j) for j in jobs)
    manifest = json.loads((tmp_path / "sh" / "jobs" / jobs[0] / "manifest.json").read_text())
    assert manifest["shard"]["count"] == 2 and manifest["shard"]["job"] == SHARD_FOLDER_RE.fullmatch(jobs[0])["job"]
    s_sh, e_sh = load_run(tmp_path / "sh")
    s_pl, e_pl = load_run(tmp_path / "plain")
    drop = ["run"]
    pd.testing.assert_frame_equal(s_sh.drop(columns=drop), s_pl.drop(columns=drop), check_exact=True)
    pd.testing.assert_frame_equal(e_sh.drop(columns=drop), e_pl.drop(columns=drop), check_exact=True)
    t_sh = (tmp_path / "sh" / "report" / "table.csv").read_text()
    t_pl = (tmp_path / "plain" / "report" / "table.csv").read_text()
    assert t_sh == t_pl


def test_one_shard_run_by_hand_then_the_report(builder, tmp_path, capsys):
    """dataset.shard=i/n by hand (one job, no -m): the job ends without a report while shards are
    missing, saying so; once all are there, the report builds."""
    for i in range(4):
        builder.add_simple(f"s{i}")
    common = ["metrics=pixel", "progress=false", f"dataset.root={builder.root}", "dataset.name=syn",
              f"results_dir={tmp_path}", "run_name=hand"]
    assert main(["run", "dataset.shard=0/2", *common]) == 0
    err = capsys.readouterr().err
    assert "report not built" in err and "shard(s) 1/2 missing" in err
    assert not (tmp_path / "hand" / "report" / "table.md").exists()
    assert main(["run", "dataset.shard=1/2", *common]) == 0
    assert (tmp_path / "hand" / "report" / "table.md").is_file()


def test_shards_need_multirun_and_a_single_choice(capsys):
    with pytest.raises(UsageError, match="both choose shards"):
        from harness.cli import _run as cli_run

        cli_run(["-m", "dataset.shards=2", "dataset.shard=0/2"])
