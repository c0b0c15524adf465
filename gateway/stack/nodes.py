"""The local cluster's compute nodes: one network namespace per node on a Linux bridge.

Measured in ../shared/notes/multinode.md: slurmctld and the services stay in the host's network
namespace; each compute node is a slurmd in its own network namespace (joined with setns, as
``nsenter --net`` does: ``ip netns exec`` remounts /sys and slurmd 22.05 then dies on cgroups), with
its own UTS namespace and hostname (Open MPI names its shared-memory segments by hostname; two
nodes with one name crash each other's ranks), its own address on the bridge and its own TmpFS.

Anything a job must reach listens on, and is addressed by, the head address on the bridge: a
server on the host's 127.0.0.1 is unreachable from a node (127.0.0.1 there is the node's own
loopback). Jobs and the gateway name it ``HEAD_NAME``, which /etc/hosts resolves to the bridge
address, or to 127.0.0.1 in the one-node layout, so one configuration serves both.

What exists is kept in ``<stack>/topology.json``: ``stack down`` removes exactly what ``up`` made,
and an ``up`` after a killed run converges from whatever half of it is left.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from gateway.process import CommandError, run_command
from gateway.stack.layout import StackPaths

log = logging.getLogger(__name__)

BRIDGE = "rgbr0"
SUBNET_PREFIX = "10.231.0"
PREFIX_LEN = 24
HEAD_ADDRESS = f"{SUBNET_PREFIX}.1"
# The name jobs and the gateway use for the head's services (S3, the gateway's API).
HEAD_NAME = "rghead"
NODE_PREFIX = "rgnode"
NETNS_DIR = Path("/run/netns")
HOSTS_FILE = Path("/etc/hosts")
HOSTS_BEGIN = "# relion-gateway stack: begin (written by `stack up`, removed by `stack down`)"
HOSTS_END = "# relion-gateway stack: end"
DEFAULT_NODES = 2
# The whole cluster declares this much, split over the nodes (config_overrides lets a node declare
# more than the machine has), so a 2-node stack offers what the one-node stack offered.
CLUSTER_CPUS = 16
CLUSTER_MEMORY_MB = 16000
# The last node of a multi-node stack carries stand-in GPUs (notes/gpus.md: character devices).
GPUS_PER_GPU_NODE = 2
NVIDIA_MAJOR = 195
IP_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Node:
    name: str
    address: str
    cpus: int
    memory_mb: int
    gpus: int = 0

    @property
    def netns(self) -> str:
        return self.name

    @property
    def veth(self) -> str:
        """The host side of the node's link (the node side is ``<veth>n``)."""
        return "rgv" + self.name.removeprefix(NODE_PREFIX)

    @property
    def netns_path(self) -> Path:
        return NETNS_DIR / self.netns


@dataclass(frozen=True)
class Topology:
    """The compute nodes and the address jobs reach the head at."""

    nodes: tuple[Node, ...]
    multinode: bool
    head_address: str
    # Why the one-node layout was used when more nodes were asked for (None: as asked).
    fallback_reason: str | None = None

    @property
    def gpu_nodes(self) -> tuple[Node, ...]:
        return tuple(n for n in self.nodes if n.gpus)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "Topology":
        data = json.loads(text)
        nodes = tuple(Node(**n) for n in data["nodes"])
        return cls(nodes, bool(data["multinode"]), str(data["head_address"]), data.get("fallback_reason"))


def plan_topology(count: int, host_node: str, fallback_reason: str | None = None) -> Topology:
    """``count`` nodes in namespaces, or the one-node layout (slurmd on the host) for count 1."""
    if count < 1:
        raise ValueError(f"--nodes must be at least 1, got {count}")
    if count == 1 or fallback_reason:
        return Topology((Node(host_node, "127.0.0.1", CLUSTER_CPUS, CLUSTER_MEMORY_MB),), False, "127.0.0.1", fallback_reason)
    cpus, memory = max(2, CLUSTER_CPUS // count), max(1000, CLUSTER_MEMORY_MB // count)
    nodes = tuple(
        Node(f"{NODE_PREFIX}{i}", f"{SUBNET_PREFIX}.{10 + i}", cpus, memory, GPUS_PER_GPU_NODE if i == count else 0)
        for i in range(1, count + 1)
    )
    return Topology(nodes, True, HEAD_ADDRESS)


def topology_file(paths: StackPaths) -> Path:
    return paths.root / "topology.json"


def load_topology(paths: StackPaths) -> Topology | None:
    try:
        return Topology.from_json(topology_file(paths).read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save_topology(paths: StackPaths, topology: Topology) -> None:
    path = topology_file(paths)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(topology.to_json())
    tmp.replace(path)


def _ip(*args: str) -> str:
    return run_command(["ip", *args], timeout=IP_TIMEOUT_S)


def _link_exists(name: str, netns: str | None = None) -> bool:
    argv = ["-n", netns, "link", "show", name] if netns else ["link", "show", name]
    try:
        _ip(*argv)
        return True
    except CommandError:
        return False


def namespaces_unavailable() -> str | None:
    """Why this machine cannot host namespaced nodes (None: it can). Probes with a throwaway namespace."""
    if os.geteuid() != 0:
        return "not root (network namespaces, veth links and a bridge need CAP_NET_ADMIN)"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    probe = "rgprobe"
    try:
        if not (NETNS_DIR / probe).exists():
            _ip("netns", "add", probe)
        _ip("netns", "del", probe)
    except CommandError as exc:
        return f"`ip netns add` failed: {exc.stderr.strip() or exc}"
    return None


def ensure_network(topology: Topology) -> tuple[list[str], set[str]]:
    """Create what is missing of the bridge, the namespaces and the links.

    Returns what was done and the nodes whose namespace or link was made anew: a slurmd still
    running in a namespace that is gone from /run/netns can no longer be reached and must restart.
    """
    done: list[str] = []
    rebuilt: set[str] = set()
    if not topology.multinode:
        return done, rebuilt
    if not _link_exists(BRIDGE):
        _ip("link", "add", BRIDGE, "type", "bridge")
        done.append(f"created bridge {BRIDGE}")
    if f"{HEAD_ADDRESS}/{PREFIX_LEN}" not in _ip("-o", "addr", "show", "dev", BRIDGE):
        _ip("addr", "add", f"{HEAD_ADDRESS}/{PREFIX_LEN}", "dev", BRIDGE)
    _ip("link", "set", BRIDGE, "up")
    for node in topology.nodes:
        if not node.netns_path.exists():
            _ip("netns", "add", node.netns)
            done.append(f"created network namespace {node.netns}")
            rebuilt.add(node.name)
        peer = node.veth + "n"
        if not _link_exists(peer, node.netns):
            # A half-made link from a killed run: the host side may exist without its peer.
            if _link_exists(node.veth):
                _ip("link", "del", node.veth)
            _ip("link", "add", node.veth, "type", "veth", "peer", "name", peer)
            _ip("link", "set", peer, "netns", node.netns)
            done.append(f"linked {node.name} to {BRIDGE}")
            rebuilt.add(node.name)
        _ip("link", "set", node.veth, "master", BRIDGE)
        _ip("link", "set", node.veth, "up")
        if f"{node.address}/{PREFIX_LEN}" not in _ip("-n", node.netns, "-o", "addr", "show", "dev", peer):
            _ip("-n", node.netns, "addr", "add", f"{node.address}/{PREFIX_LEN}", "dev", peer)
        _ip("-n", node.netns, "link", "set", peer, "up")
        _ip("-n", node.netns, "link", "set", "lo", "up")
    return done, rebuilt


def remove_network(topology: Topology | None) -> list[str]:
    """Remove the namespaces (their links go with them), the bridge and /run/netns's mount."""
    done: list[str] = []
    nodes = topology.nodes if topology else ()
    for node in nodes:
        if node.netns_path.exists():
            try:
                _ip("netns", "del", node.netns)
                done.append(f"removed network namespace {node.netns}")
            except CommandError as exc:
                log.warning("could not remove namespace %s: %s", node.netns, exc)
        if _link_exists(node.veth):
            _ip("link", "del", node.veth)
    if _link_exists(BRIDGE):
        _ip("link", "del", BRIDGE)
        done.append(f"removed bridge {BRIDGE}")
    # `ip netns add` made /run/netns a mount point that outlives the namespaces: undo it when
    # nothing else keeps a namespace there.
    if NETNS_DIR.is_dir() and not any(NETNS_DIR.iterdir()) and os.path.ismount(NETNS_DIR):
        try:
            run_command(["umount", str(NETNS_DIR)], timeout=IP_TIMEOUT_S)
            done.append(f"unmounted {NETNS_DIR}")
        except CommandError as exc:
            log.warning("could not unmount %s: %s", NETNS_DIR, exc)
    return done


def hosts_block(topology: Topology) -> list[str]:
    lines = [HOSTS_BEGIN, f"{topology.head_address} {HEAD_NAME}"]
    if topology.multinode:
        lines += [f"{node.address} {node.name}" for node in topology.nodes]
    return [*lines, HOSTS_END]


def _without_block(lines: list[str]) -> list[str]:
    kept, inside = [], False
    for line in lines:
        if line == HOSTS_BEGIN:
            inside = True
        elif line == HOSTS_END:
            inside = False
        elif not inside:
            kept.append(line)
    return kept


def write_hosts(topology: Topology | None, hosts_file: Path = HOSTS_FILE) -> bool:
    """Put our block in /etc/hosts (or take it out, for None); True when the file changed.

    Written in place, not renamed over: a container's /etc/hosts is often a bind mount. The file
    system is shared by every namespace, so the nodes read the same names.
    """
    old = hosts_file.read_text() if hosts_file.exists() else ""
    lines = _without_block(old.splitlines())
    if topology is not None:
        lines += hosts_block(topology)
    new = "\n".join(lines) + "\n"
    if new == old:
        return False
    with open(hosts_file, "w") as handle:
        handle.write(new)
    return True


def node_dir(paths: StackPaths, node: Node) -> Path:
    """A node's own files (TmpFS and what Slurm keys by node name): nodes share one file system."""
    return paths.slurm_dir / "nodes" / node.name


def ensure_node_dirs(paths: StackPaths, topology: Topology) -> None:
    for node in topology.nodes:
        tmp = node_dir(paths, node) / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        tmp.chmod(0o1777)  # TmpFS: jobs of every account write here, as in /tmp
        (paths.slurmd_spool_dir / node.name).mkdir(parents=True, exist_ok=True)


def gpu_device_dir(paths: StackPaths, node: Node) -> Path:
    return node_dir(paths, node) / "dev"


def ensure_gpu_devices(paths: StackPaths, topology: Topology) -> None:
    """Stand-in GPUs: character device nodes (Slurm checks the type and never opens them)."""
    for node in topology.gpu_nodes:
        directory = gpu_device_dir(paths, node)
        directory.mkdir(parents=True, exist_ok=True)
        for index in range(node.gpus):
            path = directory / f"nvidia{index}"
            if not path.is_char_device():
                path.unlink(missing_ok=True)
                os.mknod(path, 0o600 | 0o020000, os.makedev(NVIDIA_MAJOR, index))
