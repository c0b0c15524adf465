"""What a job's logs tell: the line that explains a failure in its stderr (RELION's own ERROR, or
ours, never the cluster's environment noise), and from RELION's stdout where each MPI rank ran."""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from gateway.jobfiles import read_job_text

# relion_refine_mpi prints one line per rank as it starts: " Leader  (0) runs on host = rgnode1",
# " Follower     1 runs on host = rgnode2"; RELION before 4.0 says Master and Slave. Ranks print
# concurrently, so a line may carry other output around it: the pattern is searched, not anchored.
_RANK_HOST = re.compile(
    r"\b(?:(?:Leader|Master)\s*\(\s*(?P<leader>\d+)\s*\)|(?:Follower|Slave)\s+(?P<follower>\d+))"
    r"\s+runs on host\s*=\s*(?P<host>[A-Za-z0-9][A-Za-z0-9._-]*)"
)


@dataclass(frozen=True)
class RankHost:
    rank: int
    host: str


def error_line(path: Path) -> str:
    """The line of a stderr file that best says why the job failed, or "" if it has none.

    RELION's own error comes first (relion_error). Failing that, the last line saying error or failed,
    then the last line with a word in it. Lines the cluster's environment prints in jobs that went well
    too (is_noise) are passed over unless there is nothing else.
    """
    # Read as a job file: the job's account owns the log dir, and a planted symlink must not turn a
    # gateway file into a job's error message (gateway/jobfiles.py).
    text = read_job_text(None, path)
    if text is None:
        return ""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    signal = [line for line in lines if not is_noise(line)]
    return relion_error(signal) or _telling_line(signal) or _telling_line(lines)


def relion_error(lines: Sequence[str]) -> str:
    """RELION's own error among stripped stderr lines, as ``ERROR: <message>``; "" if there is none.

    A RelionError (every version) prints ``in: <source>, line N``, ``ERROR: `` alone on a line and the
    message on the next, then a backtrace and the same two lines again; each MPI rank that fails prints
    it. Some messages start with ERROR themselves (``ERROR  The reference box size is 48 px...``), and
    some checks print one ``ERROR: <message>`` line.
    """
    for index, line in enumerate(lines):
        if _BARE_ERROR.match(line):
            # Another rank's "in: ..." may land between the two lines; a backtrace next means no message.
            following = next((ln for ln in lines[index + 1 :] if not _RAISED_AT.match(ln)), "")
            message = "" if _BACKTRACE.match(following) else _ERROR_PREFIX.sub("", following)
            if message:
                return f"ERROR: {message}"
            continue
        if line.startswith("ERROR"):
            message = _ERROR_PREFIX.sub("", line)
            if message:
                return f"ERROR: {message}"
    return ""


def is_noise(line: str) -> bool:
    """Whether a stderr line is one the environment prints in good jobs too (see _NOISE)."""
    return any(pattern.search(line) for pattern in _NOISE)


def _telling_line(lines: Sequence[str]) -> str:
    for line in reversed(lines):
        if _SAYS_FAILURE.search(line):
            return line
    return next((line for line in reversed(lines) if _HAS_WORD.search(line)), "")


# "ERROR:" alone (RelionError's first message line) and the ERROR a message may start with.
_BARE_ERROR = re.compile(r"^ERROR\s*:?$")
_ERROR_PREFIX = re.compile(r"^ERROR\b[\s:]*")
# What RelionError prints around its message: where it was raised, and the frame of its backtrace.
_RAISED_AT = re.compile(r"^in: .+, line \d+$")
_BACKTRACE = re.compile(r"^(?:=== Backtrace\s*===|=+)$")
_SAYS_FAILURE = re.compile(r"\b(?:error|failed|failure)\b", re.IGNORECASE)  # not "errorcode 1."
_HAS_WORD = re.compile(r"[A-Za-z]{2}")  # not MPI's "-----" rules

# Lines the cluster's environment prints whether or not the job went well, each once per shell or MPI
# rank; none of them is why a job failed.
_NOISE = tuple(
    re.compile(pattern)
    for pattern in (
        # A shell function exported by Environment Modules or Lmod (BASH_FUNC_module%%) that the shells
        # the job starts (/bin/sh) cannot import: a real RELION run that succeeded (the RELION 1.3
        # tutorial's Class2D/manual.err, 11 ranks) has nothing else in its stderr, 30 pairs of them.
        r"error importing function definition for [`'\"]?[\w.%-]+",
        r"\bsh: [\w.%-]+: line \d+: syntax error",
        # csh/tcsh login scripts run without a terminal (the same run's stdout begins so).
        r"^Warning: no access to tty\b",
        r"^Thus no job control in this shell\b",
        # A locale the node does not have.
        r"\bwarning: setlocale: \w+: cannot change locale\b",
        r"^perl: warning: (?:Setting locale failed|Please check that your locale settings|Falling back to)",
        # An LD_PRELOAD library a node lacks: the loader says it ignores it.
        r"^ERROR: ld\.so: object .* cannot be preloaded\b",
        # Slurm's pmix plugin after every step ("not considering this as fatal", Slurm's pmixp_client.c;
        # shared/notes/multinode.md): "... mpi/pmix_v3: pmixp_libpmix_finalize: ... Failed to remove
        # <tmpdir>" with strerror on its own line, and "rmdir_recursive: could not open <tmpdir>".
        r"\bmpi/pmix\S*: .*Failed to remove\b",
        r"^: [A-Z][\w ]+ \(\d+\)$",
        r"\brmdir_recursive: could not open\b",
        # Open MPI: transport components a node cannot load, and notices about its own help messages.
        r"\bmca_base_component_repository_open: unable to open mca_",
        r"Set MCA parameter \"orte_base_help_aggregate\" to 0",
        r"\bmore process(?:es)? ha(?:s|ve) sent help message\b",
        # The job side's own reports to the gateway (gateway/callbacks.py post_event): a lost event
        # never fails a job.
        r"^(?:could not report|gateway refused) \w+ event\b",
    )
)


def rank_hosts(lines: Iterable[str]) -> list[RankHost]:
    """Where each rank ran, by rank; a rank named twice (a requeued job's log appended) keeps the last."""
    hosts: dict[int, str] = {}
    for line in lines:
        for match in _RANK_HOST.finditer(line):
            rank = match.group("leader") if match.group("leader") is not None else match.group("follower")
            hosts[int(rank)] = match.group("host")
    return [RankHost(rank, hosts[rank]) for rank in sorted(hosts)]


def rank_hosts_in(path: Path) -> list[RankHost]:
    """rank_hosts of a stdout log, read line by line (RELION's stdout can be large); [] without one."""
    try:
        with path.open(errors="replace") as handle:
            return rank_hosts(handle)
    except OSError:
        return []
