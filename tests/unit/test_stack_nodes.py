"""The multi-node layout's pure parts: the plan, slurm.conf and gres.conf for it, /etc/hosts."""
from __future__ import annotations

from pathlib import Path

import pytest

from gateway.stack.layout import StackPaths
from gateway.stack.nodes import HEAD_ADDRESS, HEAD_NAME, HOSTS_BEGIN, Topology, plan_topology, write_hosts
from gateway.stack.slurm_conf import SlurmSettings, render_gres_conf, render_slurm_conf


def settings(tmp_path: Path, topology: Topology) -> SlurmSettings:
    return SlurmSettings.for_stack(StackPaths.for_state_dir(tmp_path), "vm", topology, "pw0123456789")


def test_two_nodes_split_the_cluster_and_the_last_carries_gpus() -> None:
    topology = plan_topology(2, "vm")
    assert topology.multinode and topology.head_address == HEAD_ADDRESS
    assert [(n.name, n.address, n.cpus, n.memory_mb, n.gpus) for n in topology.nodes] == [
        ("rgnode1", "10.231.0.11", 8, 8000, 0),
        ("rgnode2", "10.231.0.12", 8, 8000, 2),
    ]
    assert [n.veth for n in topology.nodes] == ["rgv1", "rgv2"]
    assert Topology.from_json(topology.to_json()) == topology


def test_one_node_or_a_fallback_keeps_slurmd_on_the_host() -> None:
    assert not plan_topology(1, "vm").multinode
    fallback = plan_topology(3, "vm", "no `ip` command (iproute2)")
    assert (fallback.multinode, fallback.head_address, fallback.fallback_reason) == (False, "127.0.0.1", "no `ip` command (iproute2)")
    with pytest.raises(ValueError, match="at least 1"):
        plan_topology(0, "vm")


def test_multinode_slurm_conf_has_what_the_notes_found_necessary(tmp_path: Path) -> None:
    text = render_slurm_conf(settings(tmp_path, plan_topology(2, "vm")))
    lines = text.splitlines()
    nodes_dir = tmp_path / "stack" / "slurm" / "nodes"
    assert "SlurmctldHost=vm(10.231.0.1)" in lines
    assert f"TmpFS={nodes_dir}/%n/tmp" in lines
    assert any(line.startswith("SlurmdSpoolDir=") and line.endswith("/%n") for line in lines)
    assert any(line.endswith("slurmd.%n.pid") for line in lines) and any(line.endswith("slurmd.%n.log") for line in lines)
    assert "NodeName=rgnode1 NodeAddr=10.231.0.11 NodeHostname=rgnode1 CPUs=8 RealMemory=8000 State=UNKNOWN" in lines
    assert "NodeName=rgnode2 NodeAddr=10.231.0.12 NodeHostname=rgnode2 CPUs=8 RealMemory=8000 Gres=gpu:2 State=UNKNOWN" in lines
    assert "PartitionName=gpu Nodes=rgnode2 MaxTime=04:00:00 State=UP" in lines
    assert {"GresTypes=gpu", "AccountingStorageTRES=gres/gpu", "AccountingStorageHost=10.231.0.1", "SlurmdTimeout=30"} <= set(lines)
    # Nothing a node must reach is addressed as loopback.
    assert "127.0.0.1" not in text and "localhost" not in text
    gres = render_gres_conf(settings(tmp_path, plan_topology(2, "vm"))).splitlines()
    assert gres[1:] == ["AutoDetect=off", f"NodeName=rgnode2 Name=gpu File={nodes_dir}/rgnode2/dev/nvidia[0-1]"]


def test_one_node_slurm_conf_is_as_before(tmp_path: Path) -> None:
    lines = render_slurm_conf(settings(tmp_path, plan_topology(1, "vm"))).splitlines()
    assert "SlurmctldHost=vm(127.0.0.1)" in lines
    assert "NodeName=vm NodeAddr=127.0.0.1 CPUs=16 RealMemory=16000 State=UNKNOWN" in lines
    assert not any(line.startswith(("TmpFS=", "GresTypes=")) for line in lines)
    assert render_gres_conf(settings(tmp_path, plan_topology(1, "vm"))).splitlines()[1:] == ["AutoDetect=off"]


def test_hosts_block_is_added_replaced_and_removed_in_place(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n10.0.0.5 other\n")
    inode = hosts.stat().st_ino
    assert write_hosts(plan_topology(2, "vm"), hosts)
    assert hosts.read_text().splitlines()[2:] == [
        HOSTS_BEGIN, f"10.231.0.1 {HEAD_NAME}", "10.231.0.11 rgnode1", "10.231.0.12 rgnode2", "# relion-gateway stack: end",
    ]
    assert not write_hosts(plan_topology(2, "vm"), hosts)  # a warm `up` changes nothing
    assert write_hosts(plan_topology(1, "vm"), hosts)
    assert f"127.0.0.1 {HEAD_NAME}" in hosts.read_text() and "rgnode1" not in hosts.read_text()
    assert write_hosts(None, hosts)
    assert hosts.read_text() == "127.0.0.1 localhost\n10.0.0.5 other\n"
    assert hosts.stat().st_ino == inode  # written in place: a bind-mounted /etc/hosts stays mounted
