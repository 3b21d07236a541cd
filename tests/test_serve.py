"""megedit serve: request validation, batching, provenance, failure isolation and reload on a fake model
(milliseconds), then the real command over real HTTP on the session's 12-edit SmolLM2 run."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from contextlib import asynccontextmanager, contextmanager
from types import SimpleNamespace

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from megedit.artifacts import ArtifactError
from megedit.data.records import EditRecord
from megedit.edited_model import Routing
from megedit.serve.app import create_app
from megedit.serve.engine import Engine
from megedit.serve.options import ServeOptions

EDITS = [EditRecord(id=f"fake:{i}", subject=f"S{i}", prompt=f"Who is edited {i}?", prompt_kind="question",
                    target_new=f"T{i}", target_true=None) for i in range(5)]


class WordTokenizer:
    """Token ids are words: enough for prompt and answer lengths."""

    def __call__(self, texts):
        return {"input_ids": [t.split() for t in texts]}

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(ids)


class FakeLM:
    """The EditedLM surface the engine uses. A query with "edited" in it is familiar (entropy 0.1 against a
    threshold of 0.5); the answer is "NEW <query>" or "OLD <query>", cut at max_tokens words, so each client can
    check it got its own answer. "boom" in a batch raises; ``gate`` holds a batch inside the model call."""

    def __init__(self, name: str = "old", gate: threading.Event | None = None):
        self.name, self.gate = name, gate
        self.spec = SimpleNamespace(neuron_dim=4)
        self.router = SimpleNamespace(threshold=0.5, kind="entropy")
        self.prepared = SimpleNamespace(edits=EDITS)
        self.tokenizer = WordTokenizer()
        self.route_batches: list[int] = []
        self.generate_batches: list[int] = []
        self.in_model = threading.Event()

    def route(self, texts):
        self.route_batches.append(len(texts))
        if any("boom" in t for t in texts):
            raise RuntimeError("the fake model exploded")
        familiar = torch.tensor(["edited" in t for t in texts])
        return Routing(embeddings=familiar.float().unsqueeze(1), entropy=torch.where(familiar, 0.1, 0.9),
                       familiar=familiar, weights=torch.zeros(len(texts), 4))

    def nearest_edits(self, embeddings):
        return [{"index": 1, "id": EDITS[1].id, "prompt": EDITS[1].prompt, "target_new": EDITS[1].target_new,
                 "similarity": 0.97} for _ in range(len(embeddings))]

    def lm_prompts(self, texts, kinds):
        return [f"{k}: {t}" for t, k in zip(texts, kinds)]

    def generate_ids(self, texts, kinds, limits, routing):
        self.generate_batches.append(len(texts))
        self.in_model.set()
        if self.gate is not None:
            assert self.gate.wait(10), "the test never opened the gate"
        words = [[("NEW" if f else "OLD"), self.name, *t.split()] for t, f in zip(texts, routing.familiar.tolist())]
        return [w[:limit] for w, limit in zip(words, limits)]


OPTIONS = ServeOptions(max_batch=8, batch_window_ms=50, max_prompt_chars=100, max_tokens_limit=32,
                       default_max_tokens=16)


def make_app(lm=None, options=OPTIONS, loader=None, plain=False):
    lm = lm or FakeLM()
    return create_app(Engine(lm, "runs/fake-run", plain=plain), options, loader), lm


@asynccontextmanager
async def serving(app):
    """The app with its lifespan (the batcher) running, and an async client over ASGI."""
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            yield client


def completion(prompt, **extra):
    return {"prompt": prompt, **extra}


def chat(content, **extra):
    return {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": content}], **extra}


# ---------------------------------------------------------------- validation: each 4xx names its field
BAD_REQUESTS = [
    ("/v1/completions", {}, "prompt"),
    ("/v1/completions", completion(5), "prompt"),
    ("/v1/completions", completion([]), "prompt"),
    ("/v1/completions", completion(["fine", 3]), "prompt[1]"),
    ("/v1/completions", completion("   "), "prompt"),
    ("/v1/completions", completion("x" * 101), "prompt"),
    ("/v1/completions", completion(["q"] * 9), "prompt"),  # more prompts than max_batch
    ("/v1/completions", completion("q", max_tokens=33), "max_tokens"),
    ("/v1/completions", completion("q", max_tokens=0), "max_tokens"),
    ("/v1/completions", completion("q", max_tokens="5"), "max_tokens"),
    ("/v1/completions", completion("q", max_tokens=True), "max_tokens"),
    ("/v1/completions", completion("q", temperature=0.7), "temperature"),
    ("/v1/completions", completion("q", temperature="0"), "temperature"),
    ("/v1/completions", completion("q", n=2), "n"),
    ("/v1/completions", completion("q", stream=True), "stream"),
    ("/v1/completions", completion("q", model=3), "model"),
    ("/v1/chat/completions", {}, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, "messages"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": ["hi"]}, "messages[0]"),
    ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "system", "content": "only a system prompt"}]}, "messages"),
    ("/v1/chat/completions", chat("x" * 101), "messages[1].content"),
    ("/v1/chat/completions", chat("q", max_completion_tokens=99), "max_completion_tokens"),
    ("/v1/chat/completions", chat("q", temperature=1), "temperature"),
    ("/admin/reload", {"run": 7}, "run"),
]


@pytest.mark.parametrize("path,body,param", BAD_REQUESTS, ids=[f"{p}:{param}" for p, _, param in BAD_REQUESTS])
def test_a_bad_request_gets_a_400_naming_its_field(path, body, param):
    app, lm = make_app(loader=lambda run: Engine(FakeLM("new"), run))
    with TestClient(app) as client:
        r = client.post(path, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert param.split("[")[0] in error["message"]
    assert lm.route_batches == []  # refused before the model


@pytest.mark.parametrize("query,param", [("limit=0", "limit"), ("limit=1001", "limit"), ("limit=ten", "limit"),
                                         ("offset=-1", "offset")])
def test_bad_edit_paging_names_its_parameter(query, param):
    app, _ = make_app()
    with TestClient(app) as client:
        r = client.get(f"/v1/edits?{query}")
    assert r.status_code == 400 and r.json()["error"]["param"] == param


def test_bodies_that_are_not_json_objects_and_unknown_paths_get_json_errors():
    app, _ = make_app()
    with TestClient(app) as client:
        not_json = client.post("/v1/completions", content=b"{prompt: 1", headers={"content-type": "application/json"})
        a_list = client.post("/v1/completions", json=["q"])
        empty = client.post("/v1/chat/completions", content=b"")
        unknown = client.get("/v1/engines")
        wrong_method = client.get("/v1/completions")
    from megedit.serve.app import MAX_BODY_BYTES

    with TestClient(app) as client:
        huge = client.post("/v1/completions", content=b"x" * (MAX_BODY_BYTES + 1))
    assert huge.status_code == 413 and huge.json()["error"]["message"].startswith("the request body exceeds")
    for r in (not_json, a_list, empty):
        assert r.status_code == 400 and r.json()["error"]["param"] is None, r.text
    assert "not valid JSON" in not_json.json()["error"]["message"]
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "not_found_error"
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()


def test_greedy_requests_in_every_accepted_form_are_answered():
    app, _ = make_app()
    with TestClient(app) as client:
        ok = [client.post("/v1/completions", json=completion("q", temperature=0, n=1, stream=False, model="any",
                                                              user="ignored")),
              client.post("/v1/completions", json=completion("q", temperature=0.0, max_tokens=None)),
              client.post("/v1/chat/completions", json={"messages": [
                  {"role": "user", "content": "first question"}, {"role": "assistant", "content": None},
                  {"role": "user", "content": [{"type": "text", "text": "second "},
                                               {"type": "text", "text": "one"}]}]})]
    assert [r.status_code for r in ok] == [200, 200, 200], [r.text for r in ok]
    assert ok[2].json()["choices"][0]["message"]["content"] == "OLD old second one"  # the last user message


# ---------------------------------------------------------------- answers and their provenance
def test_each_choice_carries_its_provenance():
    app, _ = make_app()
    with TestClient(app) as client:
        r = client.post("/v1/completions", json=completion(["an edited fact", "weather today"], max_tokens=3)).json()
        c = client.post("/v1/chat/completions", json=chat("is this edited")).json()
    routed, plain = r["choices"]
    assert r["object"] == "text_completion" and r["model"] == "fake-run" and r["megedit"]["batch_size"] == 2
    assert routed["text"] == "NEW old an" and routed["finish_reason"] == "length"
    assert routed["megedit"] == {"routed": True, "router": "entropy", "entropy": 0.1, "threshold": 0.5,
                                 "nearest_edit": {"index": 1, "id": "fake:1", "prompt": "Who is edited 1?",
                                                  "target_new": "T1", "similarity": 0.97}}
    assert plain["text"] == "OLD old weather" and not plain["megedit"]["routed"] and plain["megedit"]["entropy"] == 0.9
    assert r["usage"] == {"prompt_tokens": 4 + 3, "completion_tokens": 6, "total_tokens": 13}  # "completion: ..." words
    assert c["object"] == "chat.completion" and c["choices"][0]["message"] == {"role": "assistant",
                                                                                "content": "NEW old is this edited"}
    assert c["choices"][0]["finish_reason"] == "stop" and c["choices"][0]["megedit"]["routed"]


def test_plain_mode_bypasses_the_router_and_attaches_no_neuron():
    app, lm = make_app(plain=True)
    with TestClient(app) as client:
        r = client.post("/v1/completions", json=completion("an edited fact")).json()
        health = client.get("/health").json()
    assert r["choices"][0]["text"] == "OLD old an edited fact" and r["model"] == "fake-run-plain"
    assert r["choices"][0]["megedit"] == {"routed": False, "router": None, "entropy": None, "threshold": None,
                                          "nearest_edit": None}
    assert lm.route_batches == [] and health["mode"] == "plain"


def test_health_models_and_paged_edits():
    app, _ = make_app()
    with TestClient(app) as client:
        health = client.get("/health").json()
        models = client.get("/v1/models").json()
        page = client.get("/v1/edits?offset=3&limit=10").json()
        first = client.get("/v1/edits").json()
    assert health["status"] == "ok" and health["mode"] == "meg" and health["edits"] == 5 and health["threshold"] == 0.5
    assert health["router"] == "entropy"
    assert models["data"][0]["id"] == "fake-run"
    assert page["total"] == 5 and [e["id"] for e in page["data"]] == ["fake:3", "fake:4"]
    assert page["data"][0] == {"index": 3, "id": "fake:3", "subject": "S3", "prompt": "Who is edited 3?",
                               "prompt_kind": "question", "target_new": "T3"}
    assert len(first["data"]) == 5 and first["offset"] == 0


# ---------------------------------------------------------------- batching
def test_concurrent_requests_share_model_calls_and_each_gets_its_own_answer():
    app, lm = make_app()

    async def main():
        async with serving(app) as client:
            bodies = [completion(f"question {i}") if i % 3 else chat(f"edited question {i}") for i in range(20)]
            paths = ["/v1/completions" if i % 3 else "/v1/chat/completions" for i in range(20)]
            responses = await asyncio.gather(*(client.post(p, json=b) for p, b in zip(paths, bodies)))
            return responses, (await client.get("/health")).json()

    responses, health = asyncio.run(main())
    assert all(r.status_code == 200 for r in responses)
    for i, r in enumerate(responses):
        choice = r.json()["choices"][0]
        text = choice["text"] if "text" in choice else choice["message"]["content"]
        assert text.endswith(f"question {i}") and choice["megedit"]["routed"] == (i % 3 == 0)
    assert sum(lm.route_batches) == 20 and len(lm.route_batches) < 20 and max(lm.route_batches) <= OPTIONS.max_batch
    assert lm.generate_batches == lm.route_batches  # one route and one generation per batch
    assert health["batching"]["batches"] == len(lm.route_batches)


def test_a_failing_batch_fails_only_its_requests_and_the_server_goes_on():
    app, lm = make_app()
    with TestClient(app) as client:
        failed = client.post("/v1/completions", json=completion("boom"))
        after = client.post("/v1/completions", json=completion("fine"))
        health = client.get("/health").json()
    assert failed.status_code == 500
    assert failed.json()["error"]["type"] == "server_error" and "exploded" in failed.json()["error"]["message"]
    assert after.status_code == 200 and after.json()["choices"][0]["text"] == "OLD old fine"
    assert health["batching"]["failed_batches"] == 1 and health["batching"]["batches"] == 1


def test_a_full_queue_answers_503():
    options = ServeOptions(max_batch=1, batch_window_ms=0, max_queued_requests=1)
    gate = threading.Event()
    app, lm = make_app(FakeLM(gate=gate), options)

    async def main():
        async with serving(app) as client:
            held = asyncio.create_task(client.post("/v1/completions", json=completion("one")))
            await asyncio.to_thread(lm.in_model.wait, 5)  # the first is in the model, the next one waits
            waiting = asyncio.create_task(client.post("/v1/completions", json=completion("two")))
            await asyncio.sleep(0.05)
            refused = await client.post("/v1/completions", json=completion("three"))
            gate.set()
            return refused, await held, await waiting

    refused, held, waiting = asyncio.run(main())
    assert refused.status_code == 503 and refused.json()["error"]["type"] == "overloaded_error"
    assert held.status_code == waiting.status_code == 200


# ---------------------------------------------------------------- reload
def test_reload_swaps_between_batches_and_in_flight_requests_finish_on_the_old_run():
    gate = threading.Event()
    old = FakeLM("old", gate=gate)
    loaded = []

    def loader(run):
        loaded.append(run)
        return Engine(FakeLM("new"), run)

    app, _ = make_app(old, loader=loader)

    async def main():
        async with serving(app) as client:
            in_flight = asyncio.create_task(client.post("/v1/completions", json=completion("q")))
            await asyncio.to_thread(old.in_model.wait, 5)
            reload = await client.post("/admin/reload", json={"run": "runs/next-version"})
            gate.set()
            after = await client.post("/v1/completions", json=completion("q"))
            same_run = await client.post("/admin/reload")  # no body: re-read the run being served
            return reload, await in_flight, after, same_run

    reload, in_flight, after, same_run = asyncio.run(main())
    assert reload.status_code == 200, reload.text
    assert reload.json()["previous"]["run"] == "runs/fake-run"
    assert reload.json()["current"]["run"] == "runs/next-version"
    assert in_flight.json()["choices"][0]["text"] == "OLD old q" and in_flight.json()["model"] == "fake-run"
    assert after.json()["choices"][0]["text"] == "OLD new q" and after.json()["model"] == "next-version"
    assert same_run.status_code == 200 and loaded == ["runs/next-version", "runs/next-version"]


def test_a_failed_reload_names_the_run_and_the_old_run_keeps_serving():
    def loader(run):
        raise ArtifactError(f"{run}/prepare: no manifest.json")

    app, _ = make_app(loader=loader)
    with TestClient(app) as client:
        r = client.post("/admin/reload", json={"run": "runs/missing"})
        after = client.post("/v1/completions", json=completion("q"))
        no_loader = TestClient(make_app()[0]).post("/admin/reload")
    assert r.status_code == 400 and r.json()["error"]["param"] == "run"
    assert "runs/missing" in r.json()["error"]["message"]
    assert after.status_code == 200 and after.json()["model"] == "fake-run"
    assert no_loader.status_code == 501


def test_serve_options_refuse_nonsense():
    with pytest.raises(ValueError, match="max_batch"):
        ServeOptions(max_batch=0)
    with pytest.raises(ValueError, match="default_max_tokens"):
        ServeOptions(default_max_tokens=64, max_tokens_limit=32)


def test_an_unknown_run_stops_megedit_serve_with_one_message(tmp_path, capsys):
    from megedit.cli import main as megedit_main

    assert megedit_main(["serve", "--run", str(tmp_path / "no-such-run")]) == 2
    err = capsys.readouterr().err
    assert "cannot serve run" in err and "no-such-run" in err


# ---------------------------------------------------------------- real HTTP
@contextmanager
def uvicorn_thread(app):
    """The app under uvicorn on a free localhost port, in a thread (the server of megedit serve, without a run)."""
    import uvicorn

    from megedit.serve.process import free_port

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(60)


def test_many_clients_over_real_http_are_all_answered_in_shared_batches():
    app, lm = make_app()

    async def clients(url, n):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            return await asyncio.gather(*(client.post("/v1/completions", json=completion(f"q {i}", max_tokens=4))
                                          for i in range(n)))

    with uvicorn_thread(app) as url:
        responses = asyncio.run(clients(url, 64))
        health = httpx.get(url + "/health").json()
    assert [r.json()["choices"][0]["text"] for r in responses] == [f"OLD old q {i}" for i in range(64)]
    assert health["batching"]["prompts"] == 64 and health["batching"]["batches"] < 64


# ---------------------------------------------------------------- the real command over HTTP
@pytest.mark.slow
def test_megedit_serve_answers_edits_and_leaves_other_questions_alone_over_http(served_run):
    from megedit.prepare.artifact import load_prepared
    from megedit.serve.process import ServerProcess

    prepared = load_prepared(served_run / "prepare")
    edits = prepared.edits
    with ServerProcess(served_run, ["--steps", "20", "--max-batch", "16", "--batch-window-ms", "50",
                                    "--log-level", "warning"]) as server:
        assert server.health["mode"] == "meg" and server.health["edits"] == len(edits)

        async def ask_all(bodies):
            async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:
                return await asyncio.gather(*(client.post("/v1/chat/completions", json=b) for b in bodies))

        def question(text):
            return {"messages": [{"role": "user", "content": text}], "max_tokens": 8}

        locality = [(i, j, p) for i, e in enumerate(edits) for j, p in enumerate(e.locality) if p.kind == "question"]
        queries = [e.prompt for e in edits] + [p.prompt for _, _, p in locality]
        responses = asyncio.run(ask_all([question(q) for q in queries]))
        failed = [r.text for r in responses if r.status_code != 200]
        assert not failed, failed
        choices = [r.json()["choices"][0] for r in responses]
        # Each edit prompt's nearest edit is itself; the router memorised the edit prompts.
        for e, c in zip(edits, choices):
            assert c["megedit"]["nearest_edit"]["id"] == e.id and c["megedit"]["nearest_edit"]["similarity"] > 0.99
        routed = [c for c in choices[:len(edits)] if c["megedit"]["routed"]]
        assert len(routed) >= len(edits) - 1
        new_answers = [c["message"]["content"].startswith(e.target_new) for e, c in zip(edits, choices)
                       if c["megedit"]["routed"]]
        assert sum(new_answers) >= len(new_answers) // 2, choices[:len(edits)]
        # An unrouted question runs the untouched LM: its answer is the base model's pre-edit one.
        unrouted = [(i, j, c) for (i, j, _), c in zip(locality, choices[len(edits):]) if not c["megedit"]["routed"]]
        assert unrouted
        for i, j, c in unrouted:
            pre = prepared.pre_edit[i]["locality"][j]["text"].strip()
            assert pre.startswith(c["message"]["content"]), (pre, c)
        health = httpx.get(server.url + "/health").json()
        assert health["batching"]["batches"] < len(queries)  # concurrent questions shared model calls

        edits_page = httpx.get(server.url + "/v1/edits", params={"limit": 5}).json()
        assert edits_page["total"] == len(edits) and [e["id"] for e in edits_page["data"]] == [e.id for e in edits[:5]]
        bad = httpx.post(server.url + "/v1/completions", json={"prompt": "q", "temperature": 0.5})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "temperature"
        reload = httpx.post(server.url + "/admin/reload", json={"run": str(served_run)}, timeout=300)
        assert reload.status_code == 200 and reload.json()["current"]["edits"] == len(edits)
        again = httpx.post(server.url + "/v1/completions", json={"prompt": edits[0].prompt, "max_tokens": 4})
        assert again.status_code == 200 and json.loads(again.text)["model"] == served_run.name
    assert server.proc.returncode == 0  # SIGINT: a clean shutdown
