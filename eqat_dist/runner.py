"""The job on every rank: the phases in order (eqat_dist/phases), and any failure turned into one line
that names the rank, the block and what to do, stopping every rank."""
from __future__ import annotations

import shutil
import sys
import traceback
from pathlib import Path

from .blockap.checkpoint import ResumeError
from .blockap.trainer import NonFiniteLossError
from .data.text import DataError
from .dist.heartbeat import FOLDER as HEARTBEATS, Heartbeat, unfinished_ranks
from .dist.launch import LaunchError
from .dist.startup import check_rendezvous_reachable, check_shared_folder
from .dist.transport import PeerFailure, make_transport
from .export.staging import recover
from .models.loading import ModelLoadError
from .phases.blockap import blockap_phase
from .phases.e2e import e2e_phase
from .phases.evaluation import eval_phase
from .pipelines.round_robin import Progress
from .utils.lock import LOCK
from .utils.settings import trains_e2e
from .utils.tensors import CheckpointError


def run(args) -> int:
    transport = make_transport(args.launch)
    progress = Progress()
    out = Path(args.output)
    heartbeat = None
    try:
        if transport.world > 1:
            try:
                check_shared_folder(out, transport, args.launch)
                if transport.kind == "mpi" and trains_e2e(args):  # torch.distributed forms its group at E2E-QP
                    check_rendezvous_reachable(args.launch, transport)
            except LaunchError as err:  # the same verdict on every rank: rank 0 says it
                if transport.rank == 0:
                    print(f"eqat-dist: error: {err}", file=sys.stderr, flush=True)
                return 2
            if transport.rank == 0:
                print(f"[launch] {transport.world} ranks over {transport.kind} on {args.launch.nodes} node(s), "
                      f"rendezvous {args.launch.master_addr}:{args.launch.master_port}", flush=True)
        if transport.rank == 0:
            for line in recover(out):  # an export a kill cut short: finish its move or drop it
                print(f"[resume] {line}", flush=True)
            for line in unfinished_ranks(out / HEARTBEATS):
                print(f"[resume] {line}", flush=True)
        transport.barrier()  # every rank validated the output folder before anyone writes to it
        if transport.world > 1:  # a stopped or hung peer ends the run after --peer-timeout, naming it
            heartbeat = Heartbeat(out / HEARTBEATS, transport.rank, transport.world, args.peer_timeout, progress.where)
            transport.watchdog = heartbeat.check
            progress.on_change = heartbeat.moved
        if args.phase == "e2e":
            return e2e_phase(args, transport, progress, out, Path(args.from_dir))
        if args.phase == "eval":
            progress.phase = "evaluation"
            return eval_phase(args, out) if transport.rank == 0 else 0
        if transport.rank == 0:
            if args.overwrite and out.exists():
                for item in out.iterdir():  # everything but our lock: the folder stays ours meanwhile
                    if item.name not in (LOCK, HEARTBEATS):
                        shutil.rmtree(item) if item.is_dir() else item.unlink()
            out.mkdir(parents=True, exist_ok=True)
        transport.barrier()
        if args.blockap_done:
            code = 0
            if transport.rank == 0:
                print(f"[block-ap] finished earlier in {out} (results.json): going on with E2E-QP", flush=True)
        else:
            code = blockap_phase(args, transport, progress, out)
        if code == 0 and args.phase == "all" and args.e2e_epochs > 0:
            transport.barrier()
            code = e2e_phase(args, transport, progress, out, out)
        return code
    except (NonFiniteLossError, ResumeError) as err:
        transport.fail(f"eqat-dist: error (rank {transport.rank}): {err}")
    except PeerFailure as err:
        transport.fail(f"eqat-dist: rank {transport.rank} stopping{progress.where()}: {err}.{_kept(out)}")
    except KeyboardInterrupt:  # Ctrl-C or SIGINT to one rank: stop every rank (MPI: Abort), not only this one
        transport.fail(f"eqat-dist: rank {transport.rank} interrupted{progress.where()}.{_kept(out)}")
        return 130
    except (ModelLoadError, CheckpointError, DataError, OSError) as err:  # the input or the machine: its message says it
        if getattr(args, "debug", False):
            traceback.print_exc()
        transport.fail(f"eqat-dist: rank {transport.rank} failed{progress.where()}: {err}{_kept(out)}")
    except Exception as err:  # noqa: BLE001 - any failure must stop every rank, not hang them
        if getattr(args, "debug", False):
            traceback.print_exc()
        transport.fail(f"eqat-dist: rank {transport.rank} failed{progress.where()}: {type(err).__name__}: "
                       f"{' '.join(str(err).split())[:500]}{_kept(out)}"
                       f"{'' if getattr(args, 'debug', False) else ' (--debug prints the traceback)'}")
    finally:
        if heartbeat is not None:
            progress.on_change = None  # the last beat says done; nothing may overwrite it
            heartbeat.close()
    return 1


def _kept(out: Path) -> str:
    """What a user can resume from after a failure, when there is any."""
    kept = [what for what, there in (("Block-AP blocks", any((out / "blockap").glob("block_*"))),
                                     ("E2E-QP checkpoints", (out / "e2e_ckpt" / "latest").exists()),
                                     ("an export", (out / "config.json").exists())) if there]
    if not kept:
        return ""
    return f" Finished work is kept in {out} ({', '.join(kept)}); run the same command again to resume."


