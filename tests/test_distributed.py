"""Sharded calibration over torch.distributed (gloo, 2 processes on this machine)."""

import json
import os
import time
import traceback
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _graph_models import Dense, randomize, unit_activations

import chanprune
from chanprune.distributed import shard_rows
from chanprune.models import CifarResNet
from chanprune.models.vgg import VGG
from chanprune.sampling import positions_of_images

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo"
)

WORLD = 2


def _images(n: int = 48, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _vgg():
    torch.manual_seed(0)
    return randomize(
        VGG([12, 12, "M", 16, 16, "M", 24], num_classes=5, pool_size=1, hidden_features=16)
    )


def _resnet():
    torch.manual_seed(0)
    return randomize(CifarResNet(depth=8, num_classes=10))


def _dense():
    torch.manual_seed(0)
    return unit_activations(randomize(Dense()), _images(16, seed=7))


EXACT = dict(stats_dtype=torch.float64, holdout=0.25, positions_per_image=5, batch_size=10)
CASES = {
    "vgg": (_vgg, dict(speedup=1.8, method="lasso", **EXACT)),
    "resnet": (_resnet, dict(speedup=1.5, method="greedy_ls", **EXACT)),
    "dense": (_dense, dict(speedup=1.5, method="lasso", schedule="sensitivity", **EXACT)),
}


def _init(rank: int, init_file: str, timeout_s: float = 60.0) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
        timeout=timedelta(seconds=timeout_s),
    )  # fmt: skip


def _prune_worker(rank: int, init_file: str, out: str, case: str, overrides: dict) -> None:
    _init(rank, init_file)
    make, kwargs = CASES[case]
    try:
        pruned, report = chanprune.prune_model(
            make(), _images(), process_group=dist.group.WORLD, progress=False,
            **{**kwargs, **overrides.get(str(rank), {})},
        )  # fmt: skip
        torch.save({"state": pruned.state_dict(), "report": report.to_dict()}, f"{out}/{rank}.pt")
    except Exception as exc:  # recorded for the parent, then the rank fails
        Path(f"{out}/{rank}.err").write_text(f"{type(exc).__name__}: {exc}")
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _run(tmp_path: Path, target, *args, timeout: float = 240.0) -> tuple[list, float]:
    ctx = mp.get_context("spawn")
    init_file = str(tmp_path / "rendezvous")
    procs = [
        ctx.Process(target=target, args=(r, init_file, str(tmp_path), *args)) for r in range(WORLD)
    ]
    start = time.monotonic()
    for p in procs:
        p.start()
    for p in procs:
        p.join(max(1.0, timeout - (time.monotonic() - start)))
    elapsed = time.monotonic() - start
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, f"ranks still running after {timeout} s: a hang"
    return [p.exitcode for p in procs], elapsed


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_give_the_single_process_result(case, tmp_path):
    codes, _ = _run(tmp_path, _prune_worker, case, {})
    errors = {p.name: p.read_text() for p in tmp_path.glob("*.err")}
    assert codes == [0, 0], errors
    make, kwargs = CASES[case]
    single, report = chanprune.prune_model(
        make(), _images(), progress=False, planner="graph", **kwargs
    )
    expected = single.state_dict()
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        assert got["report"]["options"]["kept"] == report.options["kept"]
        assert got["report"]["options"]["widths"] == report.options["widths"]
        assert got["report"]["options"]["world_size"] == WORLD
        assert got["report"]["n_images"] == report.n_images
        assert got["report"]["n_heldout"] == report.n_heldout
        assert got["report"]["speedup"] == report.speedup
        layers = got["report"]["layers"]
        assert [r["n_samples"] for r in layers] == [r.n_samples for r in report.layers]
        for mine, theirs in zip(layers, report.layers):
            assert mine["rel_error"] == pytest.approx(theirs.rel_error, rel=1e-6, abs=1e-12)
            assert mine["rel_error_heldout"] == pytest.approx(
                theirs.rel_error_heldout, rel=1e-6, abs=1e-12
            )
        assert set(got["state"]) == set(expected)
        for key, value in expected.items():
            if value.is_floating_point():  # relative to the tensor's norm: float64 sums
                # in another order, through near-singular refits of 180 samples
                diff = (got["state"][key].double() - value.double()).norm()
                assert diff <= 1e-6 * value.double().norm() + 1e-12, key
            else:
                assert torch.equal(got["state"][key], value), key


def test_ranks_that_disagree_stop_with_an_error_naming_the_difference(tmp_path):
    codes, _ = _run(tmp_path, _prune_worker, "vgg", {"1": {"seed": 5}})
    assert codes[0] != 0 and codes[1] != 0
    for rank in range(WORLD):
        message = (tmp_path / f"{rank}.err").read_text()
        assert "ranks disagree" in message and "seed: rank 0 0, rank 1 5" in message
    assert not list(tmp_path.glob("*.pt"))


def _dying_worker(rank: int, init_file: str, out: str) -> None:
    _init(rank, init_file, timeout_s=30.0)
    import chanprune.distributed as cd

    calls = {"n": 0}
    original = cd.all_reduce_sum

    def all_reduce_then_die(tensor, group):
        calls["n"] += 1
        if rank == 1 and calls["n"] == 3:
            os._exit(17)  # killed in the middle of the sweep
        return original(tensor, group)

    import chanprune.sweep as sw

    # LayerStats and the moments import it from chanprune.distributed at call time.
    cd.all_reduce_sum = sw.all_reduce_sum = all_reduce_then_die
    make, kwargs = CASES["vgg"]
    try:
        chanprune.prune_model(make(), _images(), process_group=dist.group.WORLD, progress=False,
                              **kwargs)  # fmt: skip
        Path(f"{out}/{rank}.done").write_text("finished")
    except Exception:
        Path(f"{out}/{rank}.err").write_text(traceback.format_exc())
        os._exit(1)


def test_a_dead_rank_ends_the_job_on_every_rank(tmp_path):
    codes, elapsed = _run(tmp_path, _dying_worker, timeout=120.0)
    assert codes[1] == 17
    assert codes[0] != 0 and not (tmp_path / "0.done").exists()
    assert elapsed < 120.0
    assert "remote worker" in (tmp_path / "0.err").read_text()  # from gloo: the peer is gone


def test_shards_are_disjoint_and_cover_every_image():
    for n in (5, 8, 48):
        rows = [shard_rows(n, r, 3) for r in range(3)]
        assert np.array_equal(np.concatenate(rows), np.arange(n))
        assert max(map(len, rows)) - min(map(len, rows)) <= 1


def test_positions_depend_on_the_image_id_only():
    ids = torch.arange(10)
    whole = positions_of_images(ids, (6, 6), 4, seed=3, event=2)
    part = positions_of_images(ids[6:], (6, 6), 4, seed=3, event=2)
    assert torch.equal(whole.row[24:], part.row) and torch.equal(whole.col[24:], part.col)
    assert torch.equal(part.image, torch.arange(4).repeat_interleave(4))
    other = positions_of_images(ids, (6, 6), 4, seed=3, event=3)
    assert not torch.equal(whole.row * 6 + whole.col, other.row * 6 + other.col)
    flat = (whole.row * 6 + whole.col).view(10, 4)
    assert all(len(set(r.tolist())) == 4 for r in flat)  # distinct within an image


def test_process_group_needs_an_initialised_backend():
    with pytest.raises(ValueError, match="not initialised"):
        chanprune.prune_model(_vgg(), _images(), speedup=1.5, process_group=object())


def test_report_json_records_the_world_size():
    _, report = chanprune.prune_model(_vgg(), _images(), speedup=1.5, planner="graph",
                                      progress=False)  # fmt: skip
    assert json.loads(report.to_json())["options"]["world_size"] == 1


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli_worker(rank: int, init_file: str, out: str, argv: list, port: int) -> None:
    import sys

    import chanprune.cli as cli

    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(1)
    sys.exit(cli.main([str(a) for a in argv]))


def test_cli_under_two_ranks_writes_once_the_single_process_result(tmp_path):
    from PIL import Image
    from sklearn.datasets import load_digits

    import chanprune.cli as cli
    import chanprune.io as cio
    from chanprune.models import vgg_digits

    torch.manual_seed(0)
    cio.save(vgg_digits(), tmp_path / "saved.pt")
    digits = load_digits()
    for label in range(10):
        folder = tmp_path / "calib" / str(label)
        folder.mkdir(parents=True)
        for i in np.flatnonzero(digits.target == label)[:5]:
            pixels = np.round(digits.images[i] * 255 / 16).astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(folder / f"{i:04d}.png")
    (tmp_path / "two").mkdir()

    def argv(out_dir):
        return [
            "prune", "--model", tmp_path / "saved.pt", "--calib", tmp_path / "calib",
            "--preset", "digits", "--speedup", 1.5, "--planner", "graph", "--quiet",
            "--out", out_dir / "out.pt", "--report", out_dir / "report.json",
        ]  # fmt: skip

    codes, _ = _run(tmp_path / "two", _cli_worker, argv(tmp_path / "two"), _free_port())
    assert codes == [0, 0]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["out.pt", "report.json"]
    assert cli.main([str(a) for a in argv(tmp_path)]) == 0
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    one = json.loads((tmp_path / "report.json").read_text())
    assert two["options"]["world_size"] == 2 and one["options"]["world_size"] == 1
    assert two["options"]["kept"] == one["options"]["kept"]
    assert two["n_images"] == one["n_images"] == 45 and two["n_heldout"] == 5
