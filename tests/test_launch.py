"""The launch environment (eqat_dist/cluster/launch.py): every launcher's variables for a job of 2 nodes x
8 ranks, the communicator's answer under MPI, the rendezvous, the device each rank binds, and the
start-up checks (cluster/startup.py)."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eqat_dist.cluster import launch as L
from eqat_dist.cluster.launch import Launch, LaunchError, bind_device, from_environ, resolve
from eqat_dist.cluster.startup import check_rendezvous_reachable, check_shared_folder

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _job_env(launcher: str, rank: int, nodes: int = 2, per_node: int = 8) -> dict:
    """What each launcher puts in the environment of global rank `rank` (ranks in blocks per node)."""
    world, local, node = nodes * per_node, rank % per_node, rank // per_node
    stale = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}  # left by a shell: must not win over MPI's
    if launcher == "deepspeed":
        return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local), "LOCAL_SIZE": str(per_node),
                "CROSS_RANK": str(node), "CROSS_SIZE": str(nodes), "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    if launcher == "torchrun":
        return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local),
                "LOCAL_WORLD_SIZE": str(per_node), "GROUP_RANK": str(node), "MASTER_ADDR": "10.0.0.1",
                "MASTER_PORT": "29500"}
    if launcher == "mpich":
        return stale | {"PMI_RANK": str(rank), "PMI_SIZE": str(world), "MPI_LOCALRANKID": str(local),
                        "MPI_LOCALNRANKS": str(per_node)}
    if launcher == "openmpi":
        return stale | {"OMPI_COMM_WORLD_RANK": str(rank), "OMPI_COMM_WORLD_SIZE": str(world),
                        "OMPI_COMM_WORLD_LOCAL_RANK": str(local), "OMPI_COMM_WORLD_LOCAL_SIZE": str(per_node)}
    if launcher == "srun":
        return {"SLURM_PROCID": str(rank), "SLURM_STEP_NUM_TASKS": str(world), "SLURM_LOCALID": str(local),
                "SLURM_NODEID": str(node), "SLURM_STEP_NUM_NODES": str(nodes),
                "SLURM_STEP_TASKS_PER_NODE": f"{per_node}(x{nodes})", "SLURM_NTASKS": str(world)}
    raise ValueError(launcher)


class FakeComm:
    """MPI_COMM_WORLD as rank `rank` of a job whose ranks' node keys are `keys`: allgather answers
    for every rank, bcast gives rank 0's value (computed by the caller when it is rank 0)."""

    def __init__(self, rank: int, keys: list[str], rank0_value=None):
        self.rank, self.keys, self.rank0_value = rank, keys, rank0_value
        self.gathered = []

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return len(self.keys)

    def allgather(self, obj):
        assert obj == self.keys[self.rank]  # this rank contributes its own key
        return list(self.keys)

    def bcast(self, obj, root=0):
        return obj if self.rank == 0 else self.rank0_value


LAUNCHERS = ["deepspeed", "torchrun", "mpich", "openmpi", "srun"]


@pytest.mark.parametrize("launcher", LAUNCHERS)
@pytest.mark.parametrize("rank", [0, 9, 15])
def test_each_launcher_gives_rank_local_rank_ranks_per_node_and_node(launcher, rank):
    got = from_environ(_job_env(launcher, rank))
    assert (got.rank, got.world, got.local_rank, got.local_world, got.node, got.nodes) == \
        (rank, 16, rank % 8, 8, rank // 8, 2)
    assert got.uses_mpi == (launcher in ("mpich", "openmpi", "srun"))


@pytest.mark.parametrize("launcher", ["mpich", "openmpi", "srun"])
def test_under_mpi_the_communicator_decides_the_node_layout_and_rank0_the_rendezvous(launcher, monkeypatch):
    """Rank 9 of 2 x 8 with ranks placed round-robin over the nodes (what the environment alone cannot
    tell): the communicator's node keys give its local rank and node; the rendezvous is node A's
    address as rank 0 broadcast it, never this rank's loopback."""
    monkeypatch.setenv(L.NODE_ADDR, "unused-here")
    monkeypatch.setattr(L, "node_key", lambda comm: comm.keys[comm.rank])
    keys = ["10.0.0.1" if r % 2 == 0 else "10.0.0.2" for r in range(16)]  # even ranks on node A
    got = resolve(_job_env(launcher, 9), comm=FakeComm(9, keys, rank0_value=("10.0.0.1", 29500)))
    assert (got.rank, got.world, got.local_rank, got.local_world, got.node, got.nodes) == (9, 16, 4, 8, 1, 2)
    assert (got.master_addr, got.master_port) == ("10.0.0.1", 29500)


def test_rank0_picks_its_node_address_for_several_nodes_and_loopback_for_one(monkeypatch):
    monkeypatch.setattr(L, "node_key", lambda comm: comm.keys[comm.rank])
    monkeypatch.setenv(L.NODE_ADDR, "10.0.0.1")
    two_nodes = resolve(_job_env("openmpi", 0), comm=FakeComm(0, ["10.0.0.1"] * 8 + ["10.0.0.2"] * 8))
    assert two_nodes.master_addr == "10.0.0.1" and two_nodes.nodes == 2
    one_node = resolve(_job_env("openmpi", 0, nodes=1), comm=FakeComm(0, ["10.0.0.1"] * 8))
    assert one_node.master_addr == "127.0.0.1"
    monkeypatch.setenv("MASTER_ADDR", "10.9.9.9")  # the user's choice wins
    env = _job_env("openmpi", 0) | {"MASTER_ADDR": "10.9.9.9", "MASTER_PORT": str(L.free_port())}
    assert resolve(env, comm=FakeComm(0, ["a"] * 8 + ["b"] * 8)).master_addr == "10.9.9.9"


def test_rank0_without_a_reachable_address_says_to_set_master_addr(monkeypatch):
    monkeypatch.setattr(L, "node_key", lambda comm: comm.keys[comm.rank])
    monkeypatch.delenv(L.NODE_ADDR, raising=False)
    monkeypatch.setattr(L, "node_address", lambda: None)
    with pytest.raises(LaunchError, match="set MASTER_ADDR"):
        resolve(_job_env("mpich", 0), comm=FakeComm(0, ["a"] * 8 + ["b"] * 8))


def test_torch_launchers_keep_their_rendezvous_and_a_missing_one_is_refused():
    got = resolve(_job_env("deepspeed", 9))
    assert (got.master_addr, got.master_port, got.local_rank) == ("10.0.0.1", 29500, 1)
    with pytest.raises(LaunchError, match="no MASTER_ADDR"):
        resolve({"RANK": "1", "WORLD_SIZE": "2"})


def test_a_taken_port_is_refused_under_deepspeed_but_not_under_torchrun_whose_agent_holds_it():
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        with pytest.raises(LaunchError, match=f"port {port} \\(MASTER_PORT\\) is in use"):
            resolve(_job_env("deepspeed", 0) | {"MASTER_PORT": port})
        torchrun = _job_env("torchrun", 0) | {"MASTER_PORT": port, "TORCHELASTIC_USE_AGENT_STORE": "True"}
        assert resolve(torchrun).master_port == int(port)


def test_slurm_task_counts_per_node():
    assert [L.slurm_tasks_on_node("8(x2),4", n) for n in range(3)] == [8, 8, 4]
    got = from_environ(_job_env("srun", 0) | {"SLURM_STEP_TASKS_PER_NODE": "3,5", "SLURM_STEP_NUM_TASKS": "8"})
    assert got.local_world == 3


class _Cuda:
    """torch.cuda as a machine with `count` GPUs: records set_device."""

    def __init__(self, monkeypatch, count):
        self.current = []
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "set_device", lambda index: self.current.append(int(index)))


def test_every_rank_binds_its_local_gpu_and_a_single_process_the_one_asked_for(monkeypatch):
    cuda = _Cuda(monkeypatch, 8)
    rank9 = from_environ(_job_env("deepspeed", 9))
    assert bind_device("cuda", rank9) == torch.device("cuda", 1) and cuda.current == [1]
    assert bind_device("cuda:5", Launch("none")) == torch.device("cuda", 5) and cuda.current[-1] == 5
    assert bind_device("cpu", rank9) == torch.device("cpu") and len(cuda.current) == 2


def test_more_ranks_than_gpus_on_a_node_share_them_with_a_warning(monkeypatch):
    cuda, said = _Cuda(monkeypatch, 1), []
    two = Launch("torch", rank=0, world=2, local_rank=0, local_world=2)
    assert bind_device("cuda", two, log=said.append) == torch.device("cuda", 0)
    assert cuda.current == [0] and "2 ranks share 1 GPU" in said[0]


def test_the_cli_binds_the_device_before_anything_else_touches_a_gpu(tmp_path, monkeypatch):
    """--single-gpu --device cuda:3 on a machine with 4 GPUs: set_device(3), so E2E-QP's engine
    (DeepSpeed's current device) and the batches are on the same GPU."""
    from eqat_dist import cli

    cuda = _Cuda(monkeypatch, 4)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    args = cli.parse_args(["--model", "smollm2-135m", "--output", str(tmp_path / "o"), "--single-gpu", "--device",
                           "cuda:3", "--wbits", "4", "--group-size", "64", "--epochs", "0", "--phase", "block-ap"])
    assert args.machine.device == torch.device("cuda", 3) and cuda.current == [3]
    assert os.environ["LOCAL_RANK"] == "3"  # what DeepSpeed's engine and zero.Init take as the GPU


def test_single_gpu_under_a_launcher_of_several_processes_is_refused(tmp_path, monkeypatch):
    from eqat_dist import cli

    monkeypatch.setenv("PMI_RANK", "0")
    monkeypatch.setenv("PMI_SIZE", "2")
    with pytest.raises(cli.UsageError, match="--single-gpu runs one process, but the mpich launcher started 2"):
        cli.parse_args(["--model", "smollm2-135m", "--output", str(tmp_path / "o"), "--single-gpu", "--epochs", "0",
                        "--group-size", "64", "--phase", "block-ap"])


class _Peer:
    """A transport as rank `rank` of `world`, the other ranks' answers given."""

    def __init__(self, rank, world, others):
        self.rank, self.world, self.others = rank, world, list(others)

    def barrier(self):
        pass

    def allgather_object(self, obj):
        answer = self.others.pop(0)
        answer[self.rank] = obj
        return answer


def test_a_rank_that_cannot_reach_the_rendezvous_fails_in_seconds_naming_it():
    port = L.free_port()  # nothing listens there
    me = Launch("mpich", rank=1, world=2, master_addr="127.0.0.9", master_port=port)
    with pytest.raises(LaunchError, match=r"rank\(s\) 1 cannot reach rank 0's rendezvous at 127.0.0.9:\d+ .*MASTER_ADDR"):
        check_rendezvous_reachable(me, _Peer(1, 2, [[None, None]]), timeout=0.5)


def test_rank0_listens_for_the_reachability_check():
    me = Launch("mpich", rank=0, world=2, master_addr="127.0.0.1", master_port=L.free_port())
    check_rendezvous_reachable(me, _Peer(0, 2, [[None, None]]), timeout=5)  # rank 0 dials itself: fine


def test_an_output_folder_that_is_not_shared_is_refused_in_one_line(tmp_path):
    """Rank 1 on another node looks into its own (empty) folder of the same path."""
    node_a, node_b = tmp_path / "a", tmp_path / "b"
    rank0 = Launch("mpich", rank=0, world=2)
    token = []

    class Rank0(_Peer):
        def allgather_object(self, obj):
            token.append(obj)
            return [obj, None] if len(token) == 1 else [None, ("node-b", "unreadable")]

    with pytest.raises(LaunchError, match=r"is not shared: rank\(s\) 1 on node-b .*every node mounts"):
        check_shared_folder(node_a, Rank0(0, 2, []), rank0)
    node_b.mkdir()
    verdicts = []

    class Rank1(_Peer):
        def allgather_object(self, obj):
            verdicts.append(obj)
            return [token[0], None] if len(verdicts) == 1 else [None, obj]

    with pytest.raises(LaunchError, match="is not shared"):
        check_shared_folder(node_b, Rank1(1, 2, []), Launch("mpich", rank=1, world=2))
    assert verdicts[1][1].startswith("unreadable")
    assert not list(node_a.iterdir())  # the mark is removed


@pytest.mark.slow
def test_a_launcher_whose_world_mpi_does_not_see_is_refused_in_one_line(tmp_path):
    """OpenMPI's variables for 2 ranks, but mpi4py (MPICH here) initialises as a singleton: before, the
    process ran the whole job as rank 0 of 1 and exited 0."""
    env = dict(os.environ, OMPI_COMM_WORLD_SIZE="2", OMPI_COMM_WORLD_RANK="0", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(ROOT / "launch" / "run.py"), "--model", "smollm2-135m", "--wbits",
                           "4", "--group-size", "64", "--epochs", "0", "--phase", "block-ap", "--output",
                           str(tmp_path / "out"), "--eval-datasets", "", "--zeroshot-tasks", ""],
                          capture_output=True, text=True, env=env, timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-2000:]
    assert "openmpi launcher started 2 processes but mpi4py sees a world of 1" in lines[0]
    assert not (tmp_path / "out" / "config.json").exists()


@pytest.mark.slow
def test_two_nodes_on_loopback_form_e2e_process_group_on_node_a(tmp_path):
    """mpiexec -n 4: ranks 0-1 are node A (127.0.0.2), ranks 2-3 node B (127.0.0.3), through
    EQAT_NODE_ADDR. Every rank must find its local rank and node from the communicator, and E2E-QP's
    process group (ds_setup.init_distributed) must form on node A's address: the landed code set
    MASTER_ADDR=127.0.0.1 on every rank, so on two real nodes node B dialled itself and hung."""
    script = ROOT / "tests" / "helpers" / "two_nodes.py"
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    env |= {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    cmd = [str(BIN / "mpiexec"), "-n", "2", "-env", L.NODE_ADDR, "127.0.0.2", sys.executable, str(script), str(tmp_path),
           ":", "-n", "2", "-env", L.NODE_ADDR, "127.0.0.3", sys.executable, str(script), str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
    assert [(r["rank"], r["local_rank"], r["local_world"], r["node"], r["nodes"]) for r in ranks] == \
        [(0, 0, 2, 0, 2), (1, 1, 2, 0, 2), (2, 0, 2, 1, 2), (3, 1, 2, 1, 2)]
    assert {r["MASTER_ADDR"] for r in ranks} == {"127.0.0.2"}
    assert {r["store_host"] for r in ranks} == {"127.0.0.2"}
    assert [r["sum"] for r in ranks] == [6.0] * 4  # an all-reduce over the group: 0 + 1 + 2 + 3


def test_a_broken_launcher_environment_is_one_usage_error(tmp_path, monkeypatch):
    from eqat_dist import cli

    monkeypatch.setenv("PMI_RANK", "5")
    monkeypatch.setenv("PMI_SIZE", "2")
    with pytest.raises(cli.UsageError, match="says rank 5 of a world of 2"):
        cli.parse_args(["--model", "smollm2-135m", "--output", str(tmp_path / "o"), "--epochs", "0",
                        "--group-size", "64", "--phase", "block-ap"])
