"""The per-node process of the srun mode (``_node``), on its own: it forks
the node's agent and members, replaces a member that dies or retires
(``max_tasks``) while the agent runs, and never one that left because its
agent hung up (the node is closing: the new member would wait for a pool
that is gone, and hold the srun step open until shutdown cancelled it).

The agent and members here are stand-ins (a subclass of ``_Node``); the
real ones are exercised by the SLURM tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

NODE = textwrap.dedent('''
    import json, os, sys, time
    from sulis_executor import _node, _pool

    marks, member_status = sys.argv[1], int(sys.argv[2])

    class Node(_node._Node):
        member_forks = 0

        def _fork(self, become):
            if become == self._member:
                Node.member_forks += 1
            return super()._fork(become)

        def _agent(self):
            # Wait (with a deadline) until the first two members have exited
            # and been reaped: a replacement is forked in the same step.
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                pids = [int(p) for p in os.listdir(marks)]
                if len(pids) >= 2 and not any(os.path.exists(f"/proc/{p}") for p in pids[:2]):
                    return 0
                time.sleep(0.01)
            return 1

        def _member(self):
            open(os.path.join(marks, str(os.getpid())), "w").close()
            os._exit(member_status)

    outcome = Node(2, [], os.path.join(marks, "pool"), None, {}).run()
    if callable(outcome):
        os._exit(outcome())
    print(json.dumps({"status": outcome, "member_forks": Node.member_forks}))
''')


def run_node(tmp_path: Path, member_status: int) -> dict[str, int]:
    marks = tmp_path / "marks"
    marks.mkdir()
    proc = subprocess.run([sys.executable, "-c", NODE, str(marks), str(member_status)],
                          capture_output=True, text=True, timeout=50)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_members_that_leave_because_the_agent_hung_up_are_not_replaced(tmp_path: Path) -> None:
    assert run_node(tmp_path, 0) == {"status": 0, "member_forks": 2}


@pytest.mark.parametrize("status", [75, 9])  # retired (max_tasks), died
def test_members_that_retire_or_die_are_replaced(tmp_path: Path, status: int) -> None:
    from sulis_executor._pool import RETIRED

    assert RETIRED == 75
    result = run_node(tmp_path, status)
    assert result["status"] == 0 and result["member_forks"] >= 3, result
