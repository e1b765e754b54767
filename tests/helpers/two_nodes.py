"""One rank of tests/test_launch.py's two-node job on loopback: settle the launch, check the rendezvous,
form E2E-QP's process group (ds_setup.init_distributed), all-reduce, write what this rank found into
the folder given as the first argument."""
import faulthandler
import json
import os
import sys
from pathlib import Path

faulthandler.dump_traceback_later(150, exit=True)  # a hang fails in minutes, with the stacks, never for ever
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from eqat_dist.cluster.launch import export_to_environ, resolve  # noqa: E402
from eqat_dist.cluster.startup import check_rendezvous_reachable  # noqa: E402
from eqat_dist.cluster.transport import make_transport  # noqa: E402

launch = resolve()
export_to_environ(launch)
transport = make_transport(launch)
check_rendezvous_reachable(launch, transport, timeout=20)

import torch.distributed as dist  # noqa: E402

from eqat_dist.e2e.ds_setup import init_distributed  # noqa: E402

init_distributed()
store = dist.distributed_c10d._get_default_store()
while hasattr(store, "underlying_store"):
    store = store.underlying_store
total = torch.tensor([float(dist.get_rank())])
dist.all_reduce(total)
Path(sys.argv[1], f"rank{launch.rank}.json").write_text(json.dumps({"rank": launch.rank, "local_rank": launch.local_rank, "local_world": launch.local_world,
                  "node": launch.node, "nodes": launch.nodes, "MASTER_ADDR": os.environ["MASTER_ADDR"],
                  "store_host": store.host, "sum": total.item()}))
dist.destroy_process_group()
