"""Steering on the default model: what it costs the engine, and what a made vector does.

    .venv/bin/python benchmarks/steering.py                      # cost, effect and perplexity
    .venv/bin/python benchmarks/steering.py --skip-effect        # the cost only
    .venv/bin/python benchmarks/steering.py --plot docs/images/steering_french.png

Cost (the engine alone, default format, 2 threads): the median decode step at batch 1 and 16
with no row steered, every row steered (the vector after --layers), and half the rows
steered; the prefill of 16 prompts with and without capturing one layer at the last
position. Configurations are interleaved over --repeats rounds, so the machine's drift
falls on all of them alike.

Effect: a "French" vector made from the 20 English/French sentence pairs below (the
difference of mean residual streams), applied at each of --scales to 50 English chat
prompts (greedy, 40 tokens): the share of answers written in French (more French than
English function words), and the WikiText-2 perplexity (the first --ppl-tokens tokens of
the test text) under the same steering.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from pellucid import LLM  # noqa: E402
from pellucid.sampling.params import SamplingParams  # noqa: E402
from pellucid.steering import Capture, parse_layers, resolve  # noqa: E402

PAIRS = [
    ("I would like a cup of coffee, please.", "Je voudrais une tasse de café, s'il vous plaît."),
    ("The weather is beautiful today.", "Il fait très beau aujourd'hui."),
    ("Where is the train station?", "Où est la gare ?"),
    ("My sister lives in a small village near the sea.", "Ma sœur habite dans un petit village près de la mer."),
    ("We are going to the cinema tonight.", "Nous allons au cinéma ce soir."),
    ("This book is very interesting.", "Ce livre est très intéressant."),
    ("I do not understand the question.", "Je ne comprends pas la question."),
    ("The children are playing in the garden.", "Les enfants jouent dans le jardin."),
    ("Can you help me with my homework?", "Peux-tu m'aider avec mes devoirs ?"),
    ("The restaurant opens at seven in the evening.", "Le restaurant ouvre à sept heures du soir."),
    ("He has been working here for ten years.", "Il travaille ici depuis dix ans."),
    ("Thank you very much for your help.", "Merci beaucoup pour votre aide."),
    ("The museum is closed on Mondays.", "Le musée est fermé le lundi."),
    ("She likes to read before going to sleep.", "Elle aime lire avant de dormir."),
    ("How much does this shirt cost?", "Combien coûte cette chemise ?"),
    ("It is raining and the streets are wet.", "Il pleut et les rues sont mouillées."),
    ("I have never been to Paris.", "Je ne suis jamais allé à Paris."),
    ("Our teacher explains the lesson clearly.", "Notre professeur explique la leçon clairement."),
    ("The bread from this bakery is delicious.", "Le pain de cette boulangerie est délicieux."),
    ("Tomorrow we will visit our grandparents.", "Demain, nous rendrons visite à nos grands-parents."),
]
TOPICS = [
    "your favourite season", "a walk in the forest", "learning to cook", "the ocean", "a busy city", "your morning routine",
    "a good book", "the moon", "a rainy afternoon", "music", "a train journey", "gardening", "a birthday party",
    "the mountains", "a small café", "winter holidays", "a museum visit", "friendship", "a market", "the stars",
    "a long bicycle ride", "an old house", "a school day", "summer evenings", "a river", "painting", "a lighthouse",
    "bread", "a football match", "the desert", "a library", "a snowy morning", "a farm", "a bridge", "the sea breeze",
    "a thunderstorm", "breakfast", "a new job", "a concert", "the countryside", "a letter from a friend", "a puppy",
    "a picnic", "the first day of spring", "an island", "a bakery", "a chess game", "a quiet night", "a journey by boat",
    "a mountain village",
]  # fmt: skip
FRENCH = set("le la les un une des et est je tu il elle nous vous ils elles de du dans pour pas que qui sur avec au aux "
             "ce cette mon ma mes son sa ses très mais ou où suis sont était être avoir fait comme plus".split())  # fmt: skip
ENGLISH = set("the a an and is i you he she we they of in for not that who on with to this my his her very but or "
              "where am are was be have do like more it".split())  # fmt: skip


def french(text: str) -> bool:
    words = [w.strip(".,!?;:«»\"'()").lower() for w in text.replace("'", " ").split()]
    fr, en = sum(w in FRENCH for w in words), sum(w in ENGLISH for w in words)
    return fr > en and fr >= 2


def decode_steps(llm: LLM, batch: int, steer_for, steps: int) -> float:
    """Median seconds of a decode step with `batch` requests generating (after their prefill)."""
    eng = llm.engine
    p = SamplingParams(max_tokens=steps + 8, temperature=0, ignore_eos=True)
    reqs = [llm.request(f"Story {i}: once upon a time in {TOPICS[i % len(TOPICS)]},", p, steer=steer_for(i)) for i in range(batch)]
    for r in reqs:
        eng.add_request(r)
    while not all(r.prefill_done for r in reqs):
        eng.step()
    eng.step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        eng.step()
        times.append(time.perf_counter() - t)
    for r in reqs:
        eng.abort(r.request_id)
    eng.step()
    return statistics.median(times)


def prefill(llm: LLM, capture, n: int = 16) -> float:
    eng = llm.engine
    p = SamplingParams(max_tokens=1, temperature=0)
    reqs = [llm.request(f"Question {i}: tell me about {TOPICS[i]} in a few words, please, with detail.", p, capture=capture)
            for i in range(n)]  # fmt: skip
    t = time.perf_counter()
    for r in reqs:
        eng.add_request(r)
    while not all(r.finished for r in reqs):
        eng.step()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="8-12", help="layers the vector is applied after (default 8-12)")
    ap.add_argument("--scales", type=float, nargs="+", default=[0, 0.25, 0.5, 0.75, 1.0, 1.5])
    ap.add_argument("--cost-scale", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--ppl-tokens", type=int, default=1024)
    ap.add_argument("--skip-effect", action="store_true")
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    print(f"host: {platform.node()} {platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}")
    llm = LLM(max_batch=16, max_len=1024, prefix_cache=False)
    layers = parse_layers(args.layers)
    vec = llm.make_steering_vector([f for _, f in PAIRS], [e for e, _ in PAIRS], name="french")
    item = {"vector": vec, "layers": layers, "scale": args.cost_scale}
    steer = resolve(item, llm.config, dtype=llm.engine_dtype)
    print(f"vector 'french' from {len(PAIRS)} pairs; norms after layers {args.layers}: "
          + ", ".join(f"{vec.norms()[i]:.1f}" for i in layers))  # fmt: skip

    configs = {
        "batch 1, plain": (1, lambda i: None),
        "batch 1, steered": (1, lambda i: item),
        "batch 16, plain": (16, lambda i: None),
        "batch 16, every row steered": (16, lambda i: item),
        "batch 16, half steered": (16, lambda i: item if i % 2 else None),
    }
    got: dict[str, list[float]] = {k: [] for k in configs}
    cap: dict[str, list[float]] = {"prefill 16, no capture": [], "prefill 16, capture 1 layer last": []}
    one = Capture((layers[-1],), "last")
    for _ in range(args.repeats):
        for name, (b, f) in configs.items():
            got[name].append(decode_steps(llm, b, f, args.steps))
        cap["prefill 16, no capture"].append(prefill(llm, None))
        cap["prefill 16, capture 1 layer last"].append(prefill(llm, one))
    print("\n| configuration | median step ms | x plain |\n|---|---|---|")
    for name, ts in got.items():
        base = statistics.median(got["batch 1, plain" if name.startswith("batch 1,") else "batch 16, plain"])
        print(f"| {name} | {1e3 * statistics.median(ts):.2f} | {statistics.median(ts) / base:.3f} |")
    base = statistics.median(cap["prefill 16, no capture"])
    for name, ts in cap.items():
        print(f"| {name} | {1e3 * statistics.median(ts):.1f} | {statistics.median(ts) / base:.3f} |")
    del steer
    if args.skip_effect:
        return

    # WikiText-2's test text: the excerpt shipped with pellucid
    from pellucid.quantization.report import DEFAULT_TEXT

    wiki = DEFAULT_TEXT.read_text(encoding="utf-8")
    ids = llm.tokenizer.encode(wiki)[: args.ppl_tokens]
    prompts = [llm.render_chat([{"role": "user", "content": f"Write two sentences about {t}."}]) for t in TOPICS]
    p = SamplingParams(max_tokens=40, temperature=0)
    rows = []
    print("\n| scale | answers in French | WikiText-2 perplexity | example |\n|---|---|---|---|")
    for s in args.scales:
        spec = {"vector": vec, "layers": layers, "scale": s}
        outs = llm.generate(prompts, p, steer=spec)
        share = sum(french(o.text) for o in outs) / len(outs)
        lps = llm.prompt_logprobs(ids, steer=spec)[1:]
        ppl = float(torch.tensor([-x.logprob for x in lps]).mean().exp())
        rows.append((s, share, ppl))
        example = outs[0].text.strip().replace("\n", " ")[:70].replace("|", "/")
        print(f"| {s:g} | {100 * share:.0f}% ({sum(french(o.text) for o in outs)}/{len(outs)}) | {ppl:.2f} | {example} |")
    if args.plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([r[0] for r in rows], [100 * r[1] for r in rows], marker="o", color="tab:blue", label="answers in French (%)")
        ax.set_xlabel(f"scale of the 'french' vector after layers {args.layers}")
        ax.set_ylabel("answers in French (% of 50)")
        ax2 = ax.twinx()
        ax2.plot([r[0] for r in rows], [r[2] for r in rows], marker="s", color="tab:red", label="WikiText-2 perplexity")
        ax2.set_ylabel("WikiText-2 perplexity")
        ax.set_title("Steering SmolLM2-135M-Instruct toward French (default format)")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, loc="upper left")
        ax.grid(alpha=0.3)
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=110, bbox_inches="tight")
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
