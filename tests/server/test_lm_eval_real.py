"""lm-evaluation-harness against a live pellucid server, as its users run it: the
`local-completions` backend, which scores every multiple-choice answer with a completions
request of echo + logprobs (max_tokens 0), on a small task whose data is here
(tests/data/lm_eval/mc.jsonl, our own 12 questions; nothing is downloaded).

- Each answer's log-likelihood through the server equals what pellucid's own Python API
  computes for the same strings (LLM.prompt_logprobs), to float precision.
- With `tokenizer_backend=remote` (the server's tokenizer endpoints, no tokenizer file) the
  scores are the same.
- The accuracy equals, within one question, lm-eval's `hf` backend on the same GGUF file
  (transformers, float32).
"""

from __future__ import annotations

import json

import pytest
from paths import DATA

lm_eval = pytest.importorskip("lm_eval")

pytestmark = pytest.mark.real

MODEL = "smollm2-135m-instruct"
TASK = """task: pellucid_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm_eval")
    (d / "pellucid_mc.yaml").write_text(TASK.format(data=DATA / "lm_eval" / "mc.jsonl"))
    return d


@pytest.fixture(scope="module")
def served(real_path, tmp_path_factory):
    """pellucid serve (default format) and a tokenizer folder made from the GGUF for lm-eval."""
    from pellucid.api import LLM
    from pellucid.server.app import ServerThread, create_app
    from pellucid.server.state import ServerConfig

    llm = LLM(MODEL, max_batch=4, max_len=1024)
    tok_dir = tmp_path_factory.mktemp("tokenizer")
    llm.tokenizer.save_hf(tok_dir)
    # the server gets its own engine over the same weights (one engine stepped by two threads mixes their requests)
    serve = lambda c: LLM(loaded=llm.loaded, max_batch=c.max_batch, max_len=c.max_len)  # noqa: E731
    s = ServerThread(create_app(ServerConfig(model=MODEL, max_batch=4, max_len=1024), loader=serve)).start()
    assert s.wait_ready(120)
    yield s, llm, tok_dir
    s.stop()


def run(model: str, model_args: str, task_dir) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(model=model, model_args=model_args, tasks=["pellucid_mc"], log_samples=True,
                           task_manager=TaskManager(include_path=str(task_dir)), num_fewshot=0, device="cpu")  # fmt: skip


def test_local_completions_scores_equal_the_python_api_and_the_hf_backend(served, task_dir, real_path):
    srv, llm, tok_dir = served
    res = run("local-completions", f"model={MODEL},base_url={srv.url}/v1/completions,tokenizer={tok_dir},"
              "tokenizer_backend=huggingface,num_concurrent=1,max_retries=1", task_dir)  # fmt: skip
    samples = res["samples"]["pellucid_mc"]
    assert len(samples) == 12
    checked = 0
    for s in samples:
        for (context, continuation), resp in zip(s["arguments"], s["resps"], strict=True):
            got = resp[0][0]
            ctx = llm.tokenizer.encode(context)
            whole = llm.tokenizer.encode(context + continuation)
            ours = sum(x.logprob for x in llm.prompt_logprobs(whole)[len(ctx) :])
            assert got == pytest.approx(ours, abs=1e-5), (context, continuation)
            checked += 1
    assert checked == sum(len(json.loads(line)["choices"]) for line in (DATA / "lm_eval" / "mc.jsonl").open())
    # tokenizer_backend=remote: no tokenizer file, the server's /tokenizer_info, /tokenize and
    # /detokenize (vLLM's shapes) instead; the same scores
    remote = run("local-completions", f"model={MODEL},base_url={srv.url}/v1/completions,tokenizer_backend=remote,"
                 "num_concurrent=1,max_retries=1", task_dir)  # fmt: skip
    assert [s["resps"] for s in remote["samples"]["pellucid_mc"]] == [s["resps"] for s in samples]
    acc = res["results"]["pellucid_mc"]["acc,none"]
    ref = run("hf", f"pretrained={real_path.parent},gguf_file={real_path.name},dtype=float32", task_dir)
    assert abs(acc - ref["results"]["pellucid_mc"]["acc,none"]) <= 1 / 12 + 1e-9, (acc, ref["results"])
