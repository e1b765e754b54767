"""The job on every rank: the phases in order (eqat_dist/phases), and any failure turned into one line
that names the rank, the block and what to do, stopping every rank."""
from __future__ import annotations

import sys
import traceback

from . import kernels
from .blockap.checkpoint import ResumeError
from .blockap.trainer import NonFiniteLossError
from .data.text import DataError
from .cluster.heartbeat import Heartbeat, unfinished_ranks
from .cluster.launch import LaunchError
from .cluster.startup import check_rendezvous_reachable, check_shared_folder
from .cluster.transport import PeerFailure, make_transport
from .export.staging import recover
from .models.loading import ModelLoadError
from .phases.blockap import blockap_phase
from .phases.e2e import e2e_phase
from .phases.evaluation import eval_phase
from .utils.progress import Progress
from .config import RunConfig
from .preflight import blockap_already_done
from .run_folder import RunFolder
from .utils.lock import held, release_held, share
from .utils.stop import Stopped, exit_code, signal_name
from .utils.tensors import CheckpointError


def run(cfg: RunConfig, explain=lambda message: message) -> int:
    """The run on this rank; returns its exit code. `explain` turns a message's settings (`seqlen`) into
    what the user typed (the command line passes its flag names)."""
    launch = cfg.machine.launch
    kernels.set_enabled(cfg.machine.kernels)
    transport = make_transport(launch)
    progress = Progress()
    folder = RunFolder(cfg.output)
    heartbeat = None
    try:
        if transport.world > 1:
            try:
                check_shared_folder(folder.root, transport, launch)
                if transport.kind == "mpi" and cfg.trains_e2e:  # torch.distributed forms its group at E2E-QP
                    check_rendezvous_reachable(launch, transport)
            except LaunchError as err:  # the same verdict on every rank: rank 0 says it
                if transport.rank == 0:
                    print(f"eqat-dist: error: {explain(str(err))}", file=sys.stderr, flush=True)
                return 2
            if transport.rank == 0:
                print(f"[launch] {transport.world} ranks over {transport.kind} on {launch.nodes} node(s), "
                      f"rendezvous {launch.master_addr}:{launch.master_port}", flush=True)
            share(transport.allgather_object(held() if transport.rank == 0 else [])[0])  # the job holds the output
        blockap_done = blockap_already_done(cfg)  # before an overwrite clears the folder
        if transport.rank == 0:
            for line in recover(folder):  # an export a kill cut short: finish its move or drop it
                print(f"[resume] {line}", flush=True)
            for line in unfinished_ranks(folder.heartbeats):
                print(f"[resume] {line}", flush=True)
        transport.barrier()  # every rank validated the output folder before anyone writes to it
        if transport.world > 1:  # a stopped or hung peer ends the run after the peer timeout, naming it
            heartbeat = Heartbeat(folder.heartbeats, transport.rank, transport.world, cfg.machine.peer_timeout,
                                  progress.where)
            transport.watchdog = heartbeat.check
            progress.on_change = heartbeat.moved
        if cfg.phase == "e2e":
            return e2e_phase(cfg, transport, progress, folder, cfg.from_dir)
        if cfg.phase == "eval":
            progress.phase = "evaluation"
            return eval_phase(cfg, folder, transport) if transport.rank == 0 else 0
        if transport.rank == 0:
            if cfg.overwrite and folder.root.exists():
                folder.clear_for_overwrite()
            folder.root.mkdir(parents=True, exist_ok=True)
        transport.barrier()
        if blockap_done:
            code = 0
            if transport.rank == 0:
                print(f"[block-ap] finished earlier in {folder.root} (results.json): going on with E2E-QP", flush=True)
        else:
            code = blockap_phase(cfg, transport, progress, folder)
        if code == 0 and cfg.continues_to_e2e:
            transport.barrier()
            code = e2e_phase(cfg, transport, progress, folder, folder.root)
        return code
    except (NonFiniteLossError, ResumeError) as err:
        _stop(transport, f"eqat-dist: error (rank {transport.rank}): {explain(str(err))}")
    except PeerFailure as err:
        _stop(transport, f"eqat-dist: rank {transport.rank} stopping{progress.where()}: {explain(str(err))}."
                         f"{kept(cfg, folder, explain)}")
    except KeyboardInterrupt as err:  # Ctrl-C, or a stop signal (utils/stop.py): stop every rank, not only this one
        how = f"stopped by {signal_name(err)}" if isinstance(err, Stopped) else "interrupted"
        _stop(transport, f"eqat-dist: rank {transport.rank} {how}{progress.where()}.{kept(cfg, folder, explain)}",
              exit_code(err))
    except (ModelLoadError, CheckpointError, DataError, OSError) as err:  # the input or the machine: its message says it
        if cfg.debug:
            traceback.print_exc()
        _stop(transport, f"eqat-dist: rank {transport.rank} failed{progress.where()}: {explain(str(err))}"
                         f"{kept(cfg, folder, explain)}")
    except Exception as err:  # noqa: BLE001 - any failure must stop every rank, not hang them
        if cfg.debug:
            traceback.print_exc()
        _stop(transport, f"eqat-dist: rank {transport.rank} failed{progress.where()}: {type(err).__name__}: "
                         f"{explain(' '.join(str(err).split())[:500])}{kept(cfg, folder, explain)}"
                         f"{'' if cfg.debug else ' (--debug prints the traceback)'}")
    finally:
        if heartbeat is not None:
            progress.on_change = None  # the last beat says done; nothing may overwrite it
            heartbeat.close()
    return 1


def _stop(transport, message: str, code: int = 1) -> None:
    """The failure's line, then every rank down with `code`; the output's lock released first (MPI's
    Abort and os._exit skip atexit, and the run that resumes may start on another node)."""
    release_held()
    transport.fail(message, code)


def kept(cfg: RunConfig, folder: RunFolder, explain=lambda message: message) -> str:
    """What a user can resume from after a failure, when there is any, and the command that resumes:
    the same one, less `overwrite` when it had it (which would refuse to discard the kept work)."""
    work = folder.kept()
    if not work:
        return ""
    again = "the same command without `overwrite`" if cfg.overwrite else "the same command again"
    return explain(f" Finished work is kept in {folder.root} ({', '.join(work)}); run {again} to resume.")


