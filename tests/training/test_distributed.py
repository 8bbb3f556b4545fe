"""Training with torchrun, on the CPU (Gloo, 2 processes): the distributed bucketed sampler's
properties, one step of 2 processes on two shares of a batch equal to 1 process on the whole batch, the eps
offset of the variational op, and end to end: `torchrun --nproc-per-node 2 -m cmath_mer train` writes the
files of a 1-process run, its validation metrics are a 1-process evaluation's, and 1 process resumes it.
Faults: NCCL asked for on a CPU, more processes than training conversations, a rank that cannot read the
data (every rank stops, the file named)."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cmath_mer.cli import main
from cmath_mer.data import load_dataset, synth
from cmath_mer.data.batching import eval_shards, rank_batches, rows_before, split_by_utterances
from cmath_mer.errors import ConfigError
from cmath_mer.kernels import naive_variational_fusion
from cmath_mer.training import distributed

HERE = Path(__file__).parent
WORKER = HERE / "ddp_worker.py"
SMALL = '{"d_model": 32, "n_heads": 4, "n_layers": 1, "d_hidden": 32}'


def torchrun(*args, nproc: int = 2, check: bool = True) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node N ARGS` in a fresh interpreter, one thread per process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                           *map(str, args)], env=env, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


# ------------------------------------------------------------------------------------------------ sampler

def test_the_sampler_deals_every_conversation_once_with_balanced_utterances_and_no_empty_rank():
    rng = random.Random(0)
    for trial in range(200):
        n = rng.randint(1, 60)
        lengths = [rng.choice([rng.randint(1, 12), rng.randint(1, 300)]) for _ in range(n)]
        world = rng.randint(1, min(n, 8))
        order = list(range(n))
        rng.shuffle(order)
        groups, size = [[]], 0                              # single-process steps of about `budget` utterances
        budget = rng.choice([1, 20, 100, 1000])
        for c in order:
            if groups[-1] and size + lengths[c] > budget:
                groups.append([])
                size = 0
            groups[-1].append(c)
            size += lengths[c]
        steps = rank_batches(groups, lengths, world)
        dealt = [c for shares in steps for share in shares for c in share]
        assert sorted(dealt) == list(range(n)), trial          # every conversation exactly once per epoch
        assert sum(lengths[c] for c in dealt) == sum(lengths)  # the single-process run's total
        for shares in steps:
            assert len(shares) == world and all(shares), trial  # no rank waits on an empty batch
            counts = [sum(lengths[c] for c in share) for share in shares]
            longest = max(lengths[c] for share in shares for c in share)
            assert max(counts) - min(counts) <= longest, (trial, counts, longest)
        if world == 1:
            assert [s[0] for s in steps] == groups               # one process: the single-process steps


def test_the_shares_in_rank_order_are_the_single_process_batch():
    """Each rank's share is a consecutive run of the step, so its rows start where rows_before says in the
    batch one process trains on, and the ranks draw that batch's eps (a reordering dealing would not)."""
    rng = random.Random(1)
    for trial in range(300):
        n = rng.randint(1, 40)
        lengths = [rng.choice([rng.randint(1, 12), rng.randint(1, 300)]) for _ in range(n)]
        group = rng.sample(range(n), n)
        parts = rng.randint(1, n)
        shares = split_by_utterances(group, lengths, parts)
        assert [c for share in shares for c in share] == group, trial
        assert len(shares) == parts and all(shares), trial
        counts = [sum(lengths[c] for c in share) for share in shares]
        assert max(counts) - min(counts) <= max(lengths), (trial, counts)
        for r in range(parts):
            assert rows_before(shares, lengths, r) == sum(counts[:r])
    # the cuts nearest to equal shares give 186 | 12 | 279 (267 apart, more than the longest, 258): the
    # search over the smallest share finds 186 | 270 | 21
    lengths = [186, 10, 2, 258, 17, 4]
    shares = split_by_utterances(list(range(6)), lengths, 3)
    counts = [sum(lengths[c] for c in share) for share in shares]
    assert max(counts) - min(counts) <= 258 and [c for s in shares for c in s] == list(range(6)), counts


def test_too_many_processes_for_the_training_conversations_is_an_error():
    with pytest.raises(ConfigError, match="3 processes and 2 training conversation"):
        rank_batches([[0], [1]], [4, 4], 3)
    from cmath_mer.training.train import check_world_size
    with pytest.raises(ConfigError, match="at most 2 processes"):
        check_world_size({"train": [0, 1]}, 3, "x.safetensors")


def test_evaluation_shards_hold_whole_batches_each_once():
    batches = [[0, 1], [2], [3, 4, 5], [6]]
    lengths = [3, 3, 50, 1, 1, 1, 9]
    for world in (1, 2, 3, 5):
        shards = eval_shards(batches, lengths, world)
        assert len(shards) == world
        assert sorted(b for shard in shards for b in map(tuple, shard)) == sorted(map(tuple, batches))


def test_nccl_on_a_cpu_is_refused():
    with pytest.raises(ConfigError, match="nccl needs CUDA"):
        distributed.setup("cpu", "nccl")


# ------------------------------------------------------------------------------------- the variational eps

def test_shares_of_a_batch_draw_the_eps_of_the_whole_batch():
    torch.manual_seed(0)
    C, Z = 2, 8
    mu, lv = torch.randn(C, 30, Z), torch.randn(C, 30, Z)
    whole = naive_variational_fusion(mu, lv, seed=11, sample=True)[0]
    parts = [naive_variational_fusion(mu[:, a:b], lv[:, a:b], seed=11, sample=True, eps_offset=a * Z)[0]
             for a, b in ((0, 13), (13, 30))]
    assert torch.equal(torch.cat(parts), whole)
    other = naive_variational_fusion(mu[:, 13:], lv[:, 13:], seed=11, sample=True)[0]
    assert not torch.equal(other, whole[13:])                 # without the offset, rank 1 would repeat rank 0


# ------------------------------------------------------------------------------- gradient equivalence

def test_two_processes_on_two_shares_make_the_update_of_one_process_on_the_whole_batch(tmp_path):
    """One step of 2 processes (DDP, Gloo), rank 0 on 3 conversations and rank 1 on 2 (different utterance
    counts, class weights, an unlabelled utterance), equals one process on the concatenated batch: the same
    parameters after the step (fp32, 1e-5 relative) and the same loss, with sampling off and on."""
    sys.path.insert(0, str(HERE))
    import ddp_worker
    torchrun(WORKER, "step", tmp_path / "ddp.pt")
    got = torch.load(tmp_path / "ddp.pt")
    for sample in (False, True):
        data, model = ddp_worker.build(sample)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        whole = ddp_worker.SHARES[0] + ddp_worker.SHARES[1]
        counts = [sum(data.lengths()[c] for c in share) for share in ddp_worker.SHARES]
        assert counts[0] != counts[1]                     # shares of different utterance counts
        seen = ddp_worker.one_step(model, model, [data.batch(whole)], 0)
        ref = torch.cat([(p.detach() - before[n]).flatten() for n, p in model.named_parameters()])
        out = torch.cat([(got[sample]["params"][n] - before[n]).flatten() for n, _ in model.named_parameters()])
        err = ((out - ref).norm() / ref.norm()).item()
        assert err < 1e-5, (sample, err)
        for n, p in model.named_parameters():             # and each tensor on its own
            d_ref, d_out = p.detach() - before[n], got[sample]["params"][n] - before[n]
            assert (d_out - d_ref).norm() <= 1e-5 * d_ref.norm() + 1e-9, (sample, n)
        assert got[sample]["utterances"] == seen["utterances"]
        assert abs(got[sample]["loss"] - seen["loss_sum"] / seen["utterances"]) < 1e-5 * abs(got[sample]["loss"])


def test_micro_batches_draw_the_eps_of_the_whole_batch_and_normalise_by_its_totals():
    """Accumulation uses the same rule as the ranks: 2 micro-batches make the update of the whole batch,
    with sampling and class weights."""
    sys.path.insert(0, str(HERE))
    from cmath_mer.data.batching import split_by_utterances

    import ddp_worker
    updates = []
    for parts in (1, 2):
        data, model = ddp_worker.build(True)
        before = torch.cat([p.detach().flatten() for p in model.parameters()])
        group = ddp_worker.SHARES[0] + ddp_worker.SHARES[1]
        micro = split_by_utterances(group, data.lengths(), parts)
        ddp_worker.one_step(model, model, [data.batch(m) for m in micro], 0)
        updates.append(torch.cat([p.detach().flatten() for p in model.parameters()]) - before)
    assert ((updates[1] - updates[0]).norm() / updates[0].norm()).item() < 1e-5


# ------------------------------------------------------------------------------------------- end to end

def _train_args(data, out, *extra, config=SMALL):
    return ["train", "--preset", "iemocap",
            "--data", str(data), "--epochs", "2", "--device", "cpu", "--no-progress", "--set", config,
            "--out", str(out), *extra]


# dropout draws from each process's own stream; everything else (the data, the variational eps, the update)
# is the same training in 1 and 2 processes
NO_DROPOUT = SMALL[:-1] + ', "dropout": 0.0}'


def test_torchrun_two_processes_end_to_end_then_resume_with_one(tmp_path):
    from cmath_mer.training.evaluate import evaluate_split, load_trained
    data_path = tmp_path / "tiny.safetensors"
    synth(data_path, preset="iemocap", conversations=14, min_length=4, max_length=12, seed=0)
    torchrun("-m", "cmath_mer", *_train_args(data_path, tmp_path / "two", "--keep-last", config=NO_DROPOUT))
    assert main(_train_args(data_path, tmp_path / "one", "--keep-last", config=NO_DROPOUT)) == 0
    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == files
    assert not any(name.endswith(".tmp") for name in files)
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert two.keys() == one.keys() and len(two["history"]) == len(one["history"]) == 2
    for a, b in zip(two["history"], one["history"]):        # the same training, variational sample on
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    tc = json.loads((tmp_path / "two" / "train_config.json").read_text())
    assert (tc["world_size"], tc["utterances_per_step"]) == (2, tc["batch_utterances"])
    assert json.loads((tmp_path / "one" / "train_config.json").read_text())["world_size"] == 1
    # the sharded, gathered validation metrics are those of one process evaluating the same checkpoint
    data = load_dataset(data_path)
    model = load_trained(tmp_path / "two")
    meta_state = json.loads(__import__("safetensors").safe_open(str(tmp_path / "two" / "best.safetensors"),
                                                                "pt").metadata()["state"])
    best = two["selected_by_validation"]["epoch"]
    valid, _, _ = evaluate_split(model, data, meta_state["splits"]["valid"])
    assert valid == two["history"][best - 1]["valid"]
    test, _, _ = evaluate_split(model, data, meta_state["splits"]["test"])
    assert test == two["history"][best - 1]["test"]
    # resume the 2-process run with 1 process
    assert main(["train", "--data", str(data_path), "--out", str(tmp_path / "two"), "--resume", "--epochs", "3",
                 "--no-progress"]) == 0
    resumed = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert [r["epoch"] for r in resumed["history"]] == [1, 2, 3]
    assert resumed["history"][:2] == two["history"]
    assert json.loads((tmp_path / "two" / "train_config.json").read_text())["world_size"] == 1


@pytest.mark.slow
def test_torchrun_with_compile_trains_as_the_eager_two_process_run(tmp_path):
    """--compile under torchrun (DDP over the compiled model): the eager 2-process run's losses, without
    dropout (compiled dropout draws other masks). A minute of compiling per process: -m slow."""
    data_path = tmp_path / "tiny.safetensors"
    synth(data_path, preset="iemocap", conversations=14, min_length=4, max_length=12, seed=0)
    for name, extra in (("eager", ()), ("compiled", ("--compile",))):
        torchrun("-m", "cmath_mer", *_train_args(data_path, tmp_path / name, *extra, config=NO_DROPOUT))
    eager, compiled = (json.loads((tmp_path / n / "metrics.json").read_text())["history"]
                       for n in ("eager", "compiled"))
    assert [r["train_loss"] for r in compiled] == pytest.approx([r["train_loss"] for r in eager], rel=1e-5)


def test_a_rank_that_cannot_read_the_data_stops_every_rank_naming_the_file(tmp_path):
    synth(tmp_path / "d0.safetensors", preset="iemocap", conversations=6, min_length=3, max_length=6, seed=0)
    proc = torchrun(WORKER, "cli", *_train_args(tmp_path / "d{rank}.safetensors", tmp_path / "out"), check=False)
    assert proc.returncode != 0
    err = proc.stderr
    assert "d1.safetensors" in err and "rank 1" in err, err[-3000:]
    assert err.count("cmath-mer: error:") == 2, err[-3000:]      # both ranks stopped with the message
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
