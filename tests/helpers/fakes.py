"""Stand-ins that implement what the local backend and the routes use, for tests of the queue
and the backends without a model: an engine (`plan` and `run`), its requests and results, and
`assert_implements`, which checks an object against a Protocol member by member."""

from __future__ import annotations

import asyncio
import inspect
import threading
from dataclasses import dataclass, field
from types import SimpleNamespace

from fewstep.config import Settings
from fewstep.errors import Cancelled, InvalidRequest, OutOfMemory
from fewstep.records import Record
from fewstep.server.backend import JobOutput

WAIT = 30.0


class Payload:
    """Stands for a request's decoded images: only weakly referenced by the test."""


@dataclass(eq=False)
class FakeRequest:
    prompt: str = "x"
    steps: int = 3
    size: int = 100  # bytes of the encoded output
    payload: Payload = field(default_factory=Payload)


@dataclass(eq=False)
class FakeResult:
    prompt: str
    size: int
    payload: Payload  # a result that would keep the inputs alive, if it were kept


class FakeEngine:
    """What the local backend runs (`plan`, `run`), faked: steps are counted, and prompts
    steer it: "hold" waits for `release`, "boom" raises something unexpected, "oom" runs out of
    memory (as the engine reports it). `plan` refuses the prompt "invalid"."""

    settings = Settings()
    device = "cpu"
    family = SimpleNamespace(name="sd15", pipelines={"txt2img": "FakePipeline"})
    native_size = 64
    inpaint_only = False

    def __init__(self):
        self.ran: list[str] = []
        self.held = threading.Event()
        self.release = threading.Event()

    def plan(self, request):
        if request.prompt == "invalid":
            raise InvalidRequest("prompt: refused", field="prompt")
        return SimpleNamespace(request=request, merge_key=lambda: None)

    def run(self, jobs):
        (job,) = jobs  # nothing merges
        request = job.call.request
        self.ran.append(request.prompt)
        if request.prompt == "boom":
            raise RuntimeError("unexpected /secret/path")
        if request.prompt == "oom":
            raise OutOfMemory("out of memory")
        for step in range(1, request.steps + 1):
            if request.prompt == "hold" and step == 1:
                self.held.set()
                assert self.release.wait(WAIT)
            if job.progress is not None:
                job.progress(step, request.steps)
            if job.cancel is not None and job.cancel.is_set():
                raise Cancelled(f"cancelled after step {step} of {request.steps}")
        return [FakeResult(request.prompt, request.size, request.payload)]


def fake_record(**request) -> Record:
    return Record(request={"task": "txt2img", **request}, model="fake", family="sd15")


def encode(result: FakeResult) -> JobOutput:
    return JobOutput(files=((b"p" * result.size, "image/png"),),
                     record=fake_record(prompt=result.prompt))


def run(scenario):
    return asyncio.run(asyncio.wait_for(scenario(), WAIT))


async def until(predicate, what: str):
    for _ in range(int(WAIT / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def assert_implements(obj, protocol) -> None:
    """`obj` has every method of `protocol` with the same parameters (names and kinds) and the
    same way of being called (plain, coroutine, async iterator), and every attribute it
    declares. (`isinstance` on a runtime-checkable Protocol only checks that the names exist.)"""
    for name in getattr(protocol, "__annotations__", {}):
        assert hasattr(obj, name), f"{type(obj).__name__} has no attribute {name!r}"
    for name, member in vars(protocol).items():
        if name.startswith("_") or not inspect.isfunction(member):
            continue
        impl = getattr(obj, name, None)
        assert impl is not None, f"{type(obj).__name__} has no method {name!r}"
        wanted = list(inspect.signature(member).parameters.values())[1:]  # without self
        got = list(inspect.signature(impl).parameters.values())
        assert [(p.name, p.kind) for p in wanted] == [(p.name, p.kind) for p in got], \
            f"{type(obj).__name__}.{name}{inspect.signature(impl)} is not {name}" \
            f"{inspect.signature(member)}"
        assert _calling(member) == _calling(impl), \
            f"{type(obj).__name__}.{name} is {_calling(impl)}, the protocol's {_calling(member)}"


def _calling(function) -> str:
    if inspect.iscoroutinefunction(function):
        return "a coroutine"
    if inspect.isasyncgenfunction(function) or "AsyncIterator" in str(
            inspect.signature(function).return_annotation):
        return "an async iterator"
    return "plain"
