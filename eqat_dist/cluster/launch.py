"""Where this process stands in the job: rank, world, local rank, ranks on its node, node, and where
the torch.distributed rendezvous is. The one module that reads a launcher's environment.

Launchers and what they tell (a 2-node x 8-rank job, the process of global rank 9):
- deepspeed:  RANK=9 WORLD_SIZE=16 LOCAL_RANK=1 LOCAL_SIZE=8 CROSS_RANK=1 CROSS_SIZE=2, MASTER_ADDR/PORT
- torchrun:   RANK=9 WORLD_SIZE=16 LOCAL_RANK=1 LOCAL_WORLD_SIZE=8 GROUP_RANK=1, MASTER_ADDR/PORT
- MPICH, Intel MPI (hydra): PMI_RANK=9 PMI_SIZE=16 MPI_LOCALRANKID=1 MPI_LOCALNRANKS=8
- OpenMPI:    OMPI_COMM_WORLD_RANK=9 OMPI_COMM_WORLD_SIZE=16 OMPI_COMM_WORLD_LOCAL_RANK=1 ..._LOCAL_SIZE=8
- srun:       SLURM_PROCID=9 SLURM_STEP_NUM_TASKS=16 SLURM_LOCALID=1 SLURM_NODEID=1 SLURM_STEP_NUM_NODES=2
              SLURM_STEP_TASKS_PER_NODE=8(x2) (and PMI_RANK or PMIX_RANK with --mpi=pmi2|pmix)
An MPI launcher's variables come first: a RANK/WORLD_SIZE left in the environment by a shell or an
outer job must not make two MPI ranks both rank 0. Under an MPI launcher the communicator is the
truth: the ranks of a node are those that share memory (`Split_type(COMM_TYPE_SHARED)`), never
"global rank = local rank", and rank 0 chooses the rendezvous address and port and broadcasts them.

EQAT_NODE_ADDR (optional) names the address of this rank's node: ranks that give the same one form a
node, and rank 0's is the rendezvous address. On a cluster it picks the interface the nodes should
use; in tests two loopback addresses (127.0.0.2, 127.0.0.3) stand for two nodes on one machine.
"""
from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, replace

DEFAULT_PORT = 29500  # torch.distributed's and DeepSpeed's: the one default everywhere
NODE_ADDR = "EQAT_NODE_ADDR"


class LaunchError(RuntimeError):
    """The launch environment is inconsistent or unusable; the message names the fix."""


@dataclass(frozen=True)
class Launch:
    launcher: str  # none | torch (deepspeed, torchrun) | mpich | openmpi | slurm | pmix
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1  # ranks on this node
    node: int = 0
    nodes: int = 1
    master_addr: str | None = None  # the rendezvous, once known
    master_port: int | None = None

    @property
    def uses_mpi(self) -> bool:
        """Started by an MPI (or PMI) launcher: mpi4py's world must be the launcher's."""
        return self.launcher in ("mpich", "openmpi", "slurm", "pmix")


def _int(env, *names: str) -> int | None:
    for name in names:
        value = env.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError as err:
                raise LaunchError(f"{name}={value!r} is not a number; the launcher's environment is broken") from err
    return None


def slurm_tasks_on_node(spec: str, node: int) -> int | None:
    """Tasks on node `node` from Slurm's compressed list, e.g. '8(x2),4' -> 8, 8, 4."""
    counts = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            return None
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts[node] if 0 <= node < len(counts) else None


def from_environ(env=None) -> Launch:
    """What the launcher's variables say, with no communicator: cheap, before MPI is initialised.
    Under an MPI launcher the node layout is a guess here (blocks of `local_world` ranks); `resolve`
    replaces it with the communicator's answer."""
    env = os.environ if env is None else env
    if _int(env, "OMPI_COMM_WORLD_SIZE") is not None:
        kind, rank, world = "openmpi", _int(env, "OMPI_COMM_WORLD_RANK"), _int(env, "OMPI_COMM_WORLD_SIZE")
        local, local_world = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK"), _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE")
        node, nodes = None, None
    elif _int(env, "PMI_SIZE") is not None or _int(env, "MPI_LOCALNRANKS") is not None:
        kind, rank, world = "mpich", _int(env, "PMI_RANK"), _int(env, "PMI_SIZE")
        local, local_world = _int(env, "MPI_LOCALRANKID"), _int(env, "MPI_LOCALNRANKS")
        node, nodes = None, None
    elif _int(env, "SLURM_STEP_NUM_TASKS") is not None and _int(env, "SLURM_PROCID") is not None:
        kind, rank, world = "slurm", _int(env, "SLURM_PROCID"), _int(env, "SLURM_STEP_NUM_TASKS")
        node, nodes = _int(env, "SLURM_NODEID"), _int(env, "SLURM_STEP_NUM_NODES", "SLURM_NNODES")
        local = _int(env, "SLURM_LOCALID")
        spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or ""
        local_world = slurm_tasks_on_node(spec, node or 0) if spec else None
    elif _int(env, "PMIX_RANK") is not None:
        kind, rank, world = "pmix", _int(env, "PMIX_RANK"), _int(env, "PMIX_SIZE")
        local, local_world, node, nodes = _int(env, "PMIX_LOCAL_RANK"), _int(env, "PMIX_LOCAL_SIZE"), None, None
    elif _int(env, "WORLD_SIZE") is not None or _int(env, "RANK") is not None:
        kind, rank, world = "torch", _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local, local_world = _int(env, "LOCAL_RANK"), _int(env, "LOCAL_SIZE", "LOCAL_WORLD_SIZE")
        node, nodes = _int(env, "CROSS_RANK", "GROUP_RANK"), _int(env, "CROSS_SIZE", "GROUP_WORLD_SIZE")
    else:
        kind, rank, world = "none", 0, 1
    rank = rank or 0
    world = world or (rank + 1)
    if world == 1:  # one process (RANK=0 WORLD_SIZE=1 left by a launcher or a shell says the same)
        return Launch("none", master_addr=env.get("MASTER_ADDR"), master_port=_int(env, "MASTER_PORT"))
    if not 0 <= rank < world:
        raise LaunchError(f"the {kind} launcher says rank {rank} of a world of {world}; its environment is broken")
    local_world = min(local_world or world, world)
    local = rank % local_world if local is None else local
    if node is None:  # ranks placed in blocks of local_world per node (the communicator corrects it)
        node = rank // local_world
    nodes = nodes or -(-world // local_world)
    return Launch(kind, rank, world, local, local_world, node, nodes, env.get("MASTER_ADDR"), _int(env, "MASTER_PORT"))


def node_key(comm) -> str:
    """What names this rank's node for grouping: EQAT_NODE_ADDR when set, else the lowest global rank
    among the ranks that share this one's memory (MPI's COMM_TYPE_SHARED split)."""
    if os.environ.get(NODE_ADDR):
        return os.environ[NODE_ADDR]
    from mpi4py import MPI

    shared = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    try:
        return f"shared:{shared.allreduce(comm.Get_rank(), op=MPI.MIN)}"
    finally:
        shared.Free()


def layout_from_keys(keys: list[str], rank: int) -> tuple[int, int, int, int]:
    """(local rank, ranks on the node, node index, nodes) from every rank's node key, nodes numbered
    in order of their lowest rank."""
    order = list(dict.fromkeys(keys))
    mine = keys[rank]
    return keys[:rank].count(mine), keys.count(mine), order.index(mine), len(order)


def _is_loopback(addr: str) -> bool:
    return addr.startswith("127.") or addr == "::1"


def node_address() -> str | None:
    """An address of this node that other nodes can reach: EQAT_NODE_ADDR, else the first
    non-loopback address the host name resolves to, else the first of `hostname -I`."""
    if os.environ.get(NODE_ADDR):
        return os.environ[NODE_ADDR]
    try:
        infos = socket.getaddrinfo(socket.getfqdn(), None, socket.AF_INET)
        found = [info[4][0] for info in infos if not _is_loopback(info[4][0])]
        if found:
            return found[0]
    except OSError:
        pass
    try:
        import subprocess
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=10).stdout.split()
        return next((a for a in out if not _is_loopback(a) and ":" not in a), None)
    except (OSError, subprocess.SubprocessError):
        return None


def port_in_use(port: int) -> bool:
    """Whether something listens on `port`. SO_REUSEADDR as torch's TCPStore binds: a port left in
    TIME_WAIT by a run that just ended is free for it, and must not be refused here."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            return True
    return False


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _port_taken(port: int) -> LaunchError:
    free = free_port()
    return LaunchError(f"port {port} (MASTER_PORT) is in use on this machine, by another run or service; pass "
                       f"--master_port {free} to the deepspeed launcher (torchrun: --master-port {free}), or set "
                       f"MASTER_PORT={free}")


def choose_rendezvous(launch: Launch, rendezvous: bool = True) -> tuple[str, int]:
    """On rank 0: the user's MASTER_ADDR/MASTER_PORT when set; else loopback for a one-node job, this
    node's reachable address for several nodes; DEFAULT_PORT when free, else a free port. A port the
    user chose must be free now, not found taken after hours of Block-AP (when a rendezvous will come)."""
    addr = launch.master_addr
    if not addr:
        addr = "127.0.0.1" if launch.nodes == 1 else node_address()
        if not addr:
            raise LaunchError("rank 0's node has no address but loopback that other nodes could dial; set MASTER_ADDR "
                              f"(or {NODE_ADDR}) to the address of rank 0's node on the network the nodes share")
    port = launch.master_port
    if port is None:
        port = DEFAULT_PORT if launch.world > 1 and not port_in_use(DEFAULT_PORT) else free_port()
    elif rendezvous and port_in_use(port):
        raise _port_taken(port)
    return addr, port


def resolve(env=None, comm=None, rendezvous: bool = True) -> Launch:
    """The launch with the communicator's answers where there is one (an MPI launcher), and the
    rendezvous chosen (`rendezvous`: torch.distributed will be used, so its port must be free).
    Raises LaunchError when the launcher's world is not MPI's."""
    launch = from_environ(env)
    if launch.uses_mpi:
        if comm is None:
            try:
                import warnings
                with warnings.catch_warnings():  # its own warning about a foreign mpiexec: ours below names the fix
                    warnings.simplefilter("ignore", RuntimeWarning)
                    from mpi4py import MPI
            except ImportError as err:
                raise LaunchError(f"started by an MPI launcher ({launch.launcher}) but mpi4py cannot be imported "
                                  f"({err}); `pip install mpi4py mpich`, or launch with deepspeed/torchrun") from err
            comm = MPI.COMM_WORLD
        size = comm.Get_size()
        if size != launch.world:
            raise LaunchError(
                f"the {launch.launcher} launcher started {launch.world} processes but mpi4py sees a world of {size}: "
                f"the mpiexec (or srun --mpi plugin) is not of the MPI that mpi4py was built against ({_mpi_library()}); "
                "launch with that MPI's mpiexec (`python -m mpi4py --mpi-lib-version` names it), with srun --mpi=pmix or pmi2, "
                "or rebuild mpi4py for your MPI (`pip install --no-binary mpi4py mpi4py`)")
        rank = comm.Get_rank()
        local, local_world, node, nodes = layout_from_keys(comm.allgather(node_key(comm)), rank)
        launch = replace(launch, rank=rank, local_rank=local, local_world=local_world, node=node, nodes=nodes)
        try:
            chosen = choose_rendezvous(launch, rendezvous) if rank == 0 else None
        except LaunchError as err:
            chosen = err
        chosen = comm.bcast(chosen, root=0)  # every rank learns rank 0's answer, or its problem
        if isinstance(chosen, LaunchError):
            raise chosen
        return replace(launch, master_addr=chosen[0], master_port=chosen[1])
    if launch.launcher == "none":  # one process: nobody to agree with
        addr, port = choose_rendezvous(launch, rendezvous)
        return replace(launch, master_addr=addr, master_port=port)
    if not launch.master_addr or launch.master_port is None:
        raise LaunchError(f"rank {launch.rank} of {launch.world} has no MASTER_ADDR/MASTER_PORT: launch with deepspeed "
                          "or torchrun (they set them), or with mpiexec/srun")
    env = os.environ if env is None else env
    agent_store = env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"  # torchrun listens there itself
    if launch.rank == 0 and rendezvous and not agent_store and port_in_use(launch.master_port):
        raise _port_taken(launch.master_port)
    return launch


def _mpi_library() -> str:
    try:
        from mpi4py import MPI
        return " ".join(MPI.Get_library_version().split()[:3])
    except Exception:  # noqa: BLE001 - only for the message
        return "unknown"


def export_to_environ(launch: Launch) -> None:
    """What DeepSpeed and torch.distributed read later in the run. All five are set so that DeepSpeed
    skips its own discovery (which would pick the global rank as LOCAL_RANK under some launchers)."""
    os.environ.update(RANK=str(launch.rank), WORLD_SIZE=str(launch.world), LOCAL_RANK=str(launch.local_rank),
                      LOCAL_WORLD_SIZE=str(launch.local_world), MASTER_ADDR=str(launch.master_addr),
                      MASTER_PORT=str(launch.master_port))


def single_process(rendezvous: bool = True) -> Launch:
    """--single-gpu: one process, refused when a launcher started several."""
    launched = from_environ()
    if launched.world > 1:
        raise LaunchError(f"`single_gpu` runs one process, but the {launched.launcher} launcher started "
                          f"{launched.world}; drop `single_gpu`, or start one process")
    return resolve(env={k: v for k, v in os.environ.items() if k in ("MASTER_ADDR", "MASTER_PORT")},
                   rendezvous=rendezvous)


def bind_device(device, launch: Launch, log=print):
    """This rank's device, made the current one before anything is allocated: Triton launches on the
    current device, and pinned memory or a CUDA context created first would land on GPU 0 from every
    rank. Several ranks: GPU `local rank` (mod the GPUs visible); one process: the device asked for."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return device
    count = torch.cuda.device_count()
    if launch.world > 1:
        index = launch.local_rank % count
        if launch.local_world > count and launch.local_rank == 0:
            log(f"[launch] {launch.local_world} ranks share {count} GPU(s) on node {launch.node}: fine for Block-AP "
                "over MPI or gloo, but NCCL (E2E-QP on GPUs) needs one GPU per rank")
    else:
        index = device.index if device.index is not None else 0
    torch.cuda.set_device(index)
    return torch.device("cuda", index)
