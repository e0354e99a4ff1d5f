"""schemathesis fuzzes every operation of a live server's ``/openapi.json``: valid and invalid bodies alike must
get an answer the schema declares, and never a 5xx.

The server serves the tiny model with a 128-token context so that whatever a generated request asks for
(``n`` = 128, the longest ``max_tokens``) ends in a few engine steps; examples per operation are bounded, so
the whole run takes seconds.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from .conftest import API_KEY, ServerProcess

# every built-in response check except positive_data_acceptance: a body the schema allows may still be refused
# for a reason no schema can express (a prompt longer than the context, a model name the server doesn't serve)
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,"
          "negative_data_rejection")
TIME_LIMIT_S = 120


def schemathesis_command() -> str:
    found = Path(sys.executable).with_name("schemathesis")
    if found.exists():
        return str(found)
    found = shutil.which("schemathesis")
    if found is None:
        pytest.fail("schemathesis is not installed (it is in the test extra: pip install -e '.[test]')")
    return found


@pytest.fixture(scope="module")
def fuzz_server(tiny_chat_model_dir):
    server = ServerProcess([tiny_chat_model_dir, "--dtype", "float32", "--max-model-len", "128",
                            "--kv-cache-memory-bytes", str(32 << 20), "--max-num-seqs", "256",
                            "--api-key", API_KEY, "--disable-log-requests", "--disable-uvicorn-access-log"])
    yield server
    server.stop()


def test_every_operation_answers_within_its_schema(fuzz_server, tmp_path):
    command = [schemathesis_command(), "run", fuzz_server.url + "/openapi.json", "--checks", CHECKS,
               "--header", f"Authorization: Bearer {API_KEY}", "--max-examples", "25", "--seed", "19",
               "--generation-database", "none", "--request-timeout", "60", "--workers", "1",
               "--phases", "examples,coverage,fuzzing", "--no-color", "--report-dir", str(tmp_path)]
    start = time.monotonic()
    run = subprocess.run(command, capture_output=True, text=True, timeout=TIME_LIMIT_S, cwd=tmp_path)
    print(f"schemathesis: {time.monotonic() - start:.1f} s\n{run.stdout[-1500:]}")
    if run.returncode != 0:
        pytest.fail(f"schemathesis found issues:\n{run.stdout[-20000:]}\n{run.stderr[-3000:]}", pytrace=False)


def test_fuzzing_left_the_server_healthy_and_idle(fuzz_server):
    assert requests.get(fuzz_server.url + "/health", timeout=5).status_code == 200
    deadline = time.monotonic() + 20
    while (metrics := fuzz_server.metrics())["vllm:num_requests_running"] or metrics["vllm:kv_cache_usage_perc"]:
        assert time.monotonic() < deadline, f"requests left running after the fuzzing: {metrics}"
        time.sleep(0.1)
    errors = re.findall(r"^(?:ERROR|CRITICAL)\b.*$", fuzz_server.output(), re.M)
    assert not errors, errors[:5]  # bad input is the client's business: nothing the operator must look at
