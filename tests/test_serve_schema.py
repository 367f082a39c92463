"""Property-based requests against a live `bytelm serve`: schemathesis generates bodies, parameters and headers from
the server's own /openapi.json, both valid ones (POSITIVE) and ones that break the schema (NEGATIVE), for every
operation, and checks that none is answered with a 5xx (its `not_a_server_error`). A small run in CI; a larger one
with -m slow."""

import pytest
import torch

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("fastapi")

import requests  # noqa: E402  (schemathesis' transport)
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from bytelm import Megabyte, MegabyteConfig  # noqa: E402
from tests.test_serve import KEY, Server  # noqa: E402


def serve(tmp_path_factory, modality: str, max_seq_len: int) -> Server:
    torch.manual_seed(0)
    model = Megabyte(MegabyteConfig.from_name("tiny", modality=modality, max_seq_len=max_seq_len)).eval()
    return Server(model.save_pretrained(tmp_path_factory.mktemp("schema") / "tiny"), "--max-streams", "4",
                  "--body-timeout", "2")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A 64-byte context: whatever a generated request asks for, it generates at most 64 bytes (a fast run)."""
    s = serve(tmp_path_factory, "bytes", 64)
    yield s
    s.kill()


def fuzz(server, examples: int) -> dict[str, int]:
    """Requests sent per operation; fails (with hypothesis' smallest failing case) on the first 5xx."""
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    sent: dict[str, int] = {}
    with requests.Session() as session:
        for result in schema.get_all_operations():
            op = result.ok()
            for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
                @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate, Phase.shrink],
                          suppress_health_check=list(HealthCheck))
                @given(case=op.as_strategy(generation_mode=mode))
                def one(case):
                    response = case.call(base_url=server.url, session=session,
                                         headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
                    sent[case.operation.label] = sent.get(case.operation.label, 0) + 1
                    case.validate_response(response, checks=[not_a_server_error])

                try:
                    one()
                except Unsatisfiable:  # nothing to make invalid: a GET without parameters has no negative case
                    assert mode == schemathesis.GenerationMode.NEGATIVE
    return sent


def test_no_generated_request_gets_a_server_error(server):
    sent = fuzz(server, examples=10)
    assert len(sent) >= 8  # every operation was exercised
    print(f"schemathesis sent {sum(sent.values())} requests: {sent}")


@pytest.mark.slow
def test_no_generated_request_gets_a_server_error_in_a_long_run(server):
    """2,404 requests, none a 5xx (17 min on 2 busy cores)."""
    sent = fuzz(server, examples=300)
    print(f"schemathesis sent {sum(sent.values())} requests: {sent}")


@pytest.mark.slow
@pytest.mark.parametrize("modality", ["image:6x4x3", "audio:8000:pcm16"])
def test_no_generated_request_to_a_media_model_gets_a_server_error(tmp_path_factory, modality):
    """The image and audio endpoints' own handlers (a bytes model refuses them at once): 244 requests each, none a
    5xx."""
    s = serve(tmp_path_factory, modality, 256)
    try:
        sent = fuzz(s, examples=30)
    finally:
        s.kill()
    print(f"schemathesis sent {sum(sent.values())} requests to a {modality} model: {sent}")
