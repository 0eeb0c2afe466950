"""LiveKit's dispatch of avatar jobs, simulated without a LiveKit server: a loopback WebSocket speaking the agent
protocol (``benchmarks/fleet.py``'s :class:`Dispatcher`) registers real LiveKit Agents workers, reads the loads
they report, draws a worker for each new room with weight ``1 - load`` among those not FULL (as livekit-server's
``selectWorkerWeightedByLoad``), and the job lands on the worker drawn."""

from __future__ import annotations

import asyncio
import collections
import random

import pytest

pytest.importorskip("livekit.agents", reason="the livekit extra is not installed")

from edtalk_live.benchmarks.fleet import DEV_KEY, DEV_SECRET, Dispatcher, NoCapacity, weighted_pick  # noqa: E402


def test_the_draw_is_weighted_by_one_minus_load_and_skips_workers_without_capacity():
    rng = random.Random(0)
    loads = {"a": 0.2, "b": 0.6, "c": 1.0, "d": 1.3}
    n = 20000
    counts = collections.Counter(weighted_pick(loads, rng) for _ in range(n))
    assert counts["a"] / n == pytest.approx(0.8 / 1.2, abs=0.015)
    assert counts["b"] / n == pytest.approx(0.4 / 1.2, abs=0.015)
    assert counts["c"] == counts["d"] == 0, "a worker at load 1 or above has no weight"
    with pytest.raises(NoCapacity, match="sufficient capacity"):
        weighted_pick({"a": 1.0, "b": 1.5}, rng)
    with pytest.raises(NoCapacity):
        weighted_pick({}, rng)


@pytest.fixture()
def fast_status(monkeypatch):
    """Workers report their status every 0.1 s instead of 2.5 s (read when a worker connects)."""
    import livekit.agents.worker as lk_worker

    monkeypatch.setattr(lk_worker, "UPDATE_STATUS_INTERVAL", 0.1)


def test_two_real_workers_report_their_loads_and_jobs_land_on_the_worker_drawn(fast_status):
    asyncio.run(_two_workers())


async def _two_workers() -> None:
    import aiohttp

    from edtalk_live.benchmarks.fleet import agent_server

    loads = {"a": 0.2, "b": 0.6}                  # the stand-in load functions read these
    landed: dict[str, tuple[str, str]] = {}       # job id -> (worker name, room), written by the job itself

    def entrypoint(name: str):
        async def run(ctx) -> None:              # a job thread of that worker, with its own loop
            landed[ctx.job.id] = (name, ctx.job.room.name)
            ctx.shutdown("done")
        return run

    def load_of(name: str):
        return lambda: loads[name]

    dispatcher = Dispatcher(api_key=DEV_KEY, api_secret=DEV_SECRET, rng=random.Random(7))
    url = await dispatcher.start()
    servers = {name: agent_server(url, load_of(name), entrypoint(name), load_threshold=0.8) for name in loads}
    runs = [asyncio.ensure_future(s.run()) for s in servers.values()]
    try:
        # the token is checked: a socket without one is refused
        async with aiohttp.ClientSession() as http:
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(url + "/agent")
            assert refused.value.status == 401

        await dispatcher.wait_workers(2, timeout=20)
        ids = {name: s.id for name, s in servers.items()}
        names = {v: k for k, v in ids.items()}
        seen = dispatcher.workers

        def reported(a: float, b: float) -> bool:
            return (abs(seen[ids["a"]].load - a) < 1e-6 and abs(seen[ids["b"]].load - b) < 1e-6)

        await dispatcher.wait_for(lambda: reported(0.2, 0.6), timeout=10)
        assert all(w.available and w.agent_name == "edtalk-avatar" for w in seen.values())

        # the draw reads the loads the workers reported: shares 0.8 : 0.4
        picks = collections.Counter(names[dispatcher.pick().id] for _ in range(6000))
        assert picks["a"] / 6000 == pytest.approx(2 / 3, abs=0.03)

        async def settled() -> None:              # the last job has ended and the workers under 0.8 say they have room
            def done() -> bool:
                return all(not seen[i].running and (seen[i].available or loads[n] >= 0.8) for n, i in ids.items())
            await dispatcher.wait_for(done, 10)

        async def dispatch(room: str):
            d = await dispatcher.dispatch(room)
            if d.worker:
                await dispatcher.wait_for(lambda: d.job_id in landed, timeout=10)
            await settled()
            return d

        # jobs land on the worker drawn, and the workers report them ended
        for k in range(10):
            d = await dispatch(f"room-{k}")
            assert d.worker in names and not d.declined and not d.error, d
            assert landed[d.job_id] == (names[d.worker], f"room-{k}")
            assert set(d.loads) == set(names) and d.loads[ids["a"]] == pytest.approx(0.2)
        assert len(landed) == 10

        # a worker above its threshold reports FULL and gets nothing
        loads["b"] = 0.9
        await dispatcher.wait_for(lambda: not seen[ids["b"]].available and reported(0.2, 0.9), timeout=10)
        assert [e[2] for e in dispatcher.events if e[1] == ids["b"]][-1] == "full"
        assert {dispatcher.pick().id for _ in range(500)} == {ids["a"]}
        for k in range(4):
            d = await dispatch(f"full-{k}")
            assert d.worker == ids["a"] and landed[d.job_id][0] == "a"

        # between two status reports the dispatcher's view is stale: a worker it still thinks has room declines
        # (it checks its own load again) and the room is drawn again among the others
        seen[ids["b"]].available, seen[ids["b"]].load = True, 0.0
        seen[ids["a"]].load = 0.99                 # so that b is drawn first
        d = await dispatcher.dispatch("stale")
        assert d.declined == [ids["b"]] and d.worker == ids["a"], d
        await dispatcher.wait_for(lambda: d.job_id in landed, timeout=10)
        assert landed[d.job_id] == ("a", "stale")
        await settled()

        # every worker FULL: the room gets no worker
        loads["a"] = 0.95
        await dispatcher.wait_for(lambda: not any(w.available for w in seen.values()), timeout=10)
        d = await dispatcher.dispatch("nobody")
        assert d.worker is None and "sufficient capacity" in d.error
        loads["a"] = loads["b"] = 0.1
        await dispatcher.wait_for(lambda: all(w.available for w in seen.values()), timeout=10)
        assert [e[2] for e in dispatcher.events if e[1] == ids["a"]][-2:] == ["full", "available"]
    finally:
        for s in servers.values():
            await s.aclose()
        await asyncio.gather(*runs, return_exceptions=True)
        await dispatcher.stop()


@pytest.mark.slow
def test_a_short_fleet_run_places_every_room_on_a_worker_with_its_own_engine(tmp_path, capsys):
    import json

    from edtalk_live.benchmarks.fleet import main

    out_json = tmp_path / "fleet.json"
    code = main(["--workers", "2", "--rooms", "3", "--step", "2", "--hold", "3", "--settle", "1",
                 "--json", str(out_json)])
    out = capsys.readouterr().out
    assert code == 0, out
    table = [line for line in out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(table) == 3 + 2, out                      # a row before each room, one at the end
    result = json.loads(out_json.read_text())
    assert all(d["worker"] for d in result["dispatches"])
    last = result["rows"][-1]
    assert last["rooms"] == 3 and sum(w["rooms"] for w in last["workers"]) == 3
    assert all(w["load"] is not None and 0.0 <= w["load"] <= 1.0 for w in last["workers"])
    assert last["due"] > 0 and last["fps"], "the rooms' streams sent frames over the last step"
    assert "rooms placed 3 of 3" in out
